"""`Pipeline`: a model loaded once with its add-ons, turning each `Request` into images and their metadata.

    pipeline = Pipeline.from_checkpoint("sd-v1-5.safetensors", device="cuda", precision="fp16")
    result = pipeline(Request("a photograph of an astronaut riding a horse", seed=42, steps=30, sampler="euler_a"))
    result.images[0].save("astronaut.png")

Everything that can be checked without the weights is checked first (`Pipeline.check` returns the `Setup`), then
`Pipeline.load(setup)` reads them; `from_checkpoint` does both. A call encodes the prompts, samples (or lets a
sampling add-on sample), guards against NaN, decodes, and splits the batch in halves when memory runs out.
"""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ldm import optimize
from ldm.checkpoints import CheckpointError
from ldm.devices import accelerator_memory, choose_device, choose_dtype
from ldm.loading import (LoadError, check_loadable, checkpoint_hash, checkpoint_shapes, load_config, load_model,
                         resolve_config)
from ldm.models.diffusion.noise import ImageNoise
from ldm.models.diffusion.guidance import embedded_guidance_width, with_embedded_guidance
from ldm.models.diffusion.k_denoisers import LCMCompVisDenoiser
from ldm.models.diffusion.samplers import compvis_spacing, resolve_sampler, sample, sampler_display_name
from ldm.models.diffusion.schedule import NoiseSchedule
from ldm.models.diffusion.schedule_types import a1111_sigmas, is_a1111_schedule_type
from ldm.modules.encoders.modules import clip_skip_encoders, use_clip_skip
from ldm.modules.encoders.prompt_weighting import weighted_conditioning
from ldm.pipeline.addons.base import AddOn, SampleCall
from ldm.pipeline.addons.embeddings import Embeddings
from ldm.pipeline.addons.lora import Loras, prompt_lora_tags
from ldm.pipeline.decoding import decode_to_pixels, free_accelerator_memory, run_in_sub_batches
from ldm.pipeline.errors import UsageError
from ldm.pipeline.extra_networks import strip_extra_networks
from ldm.pipeline.memory import (check_request_memory, check_weights_fit, out_of_memory_advice,
                                 resident_weight_bytes, weight_bytes_by_part)
from ldm.pipeline.metadata import ImageRecord, request_fields
from ldm.pipeline.model_info import check_against_model, model_defaults, refuse_special_models
from ldm.pipeline.prompt_checks import prompt_notes
from ldm.pipeline.request import Request

Report = Callable[[str], None]
OFFLOAD_MODES = ("model", "sequential")


def _ignore(message: str) -> None:
    """The default `note` and `info`: the library prints nothing (the scripts pass `print`)."""


@dataclass(frozen=True)
class Options:
    """How the model is loaded and run: weights (`use_ema`, `v_prediction`, `vae`, `unet`: files replacing those
    parts, see `ldm.weight_parts`), memory modes (`offload`
    "model" | "sequential", `attention_slicing`, `vae_tiling` in tiles of `vae_tile` latent pixels, `vae_slicing`),
    speed (`fast_paths`: fused projections and the device's best kernels, same results to float rounding;
    `compile`, `cuda_graphs`), whether records carry file hashes (`hash_files`, hashed in a background thread), and
    whether yaml configs may build classes from outside this project (`trust_config`; see docs/security.md)."""

    use_ema: bool | None = None
    v_prediction: bool | None = None
    vae: str | None = None
    unet: str | None = None
    offload: str | None = None
    attention_slicing: bool = False
    vae_tiling: bool = False
    vae_tile: int = 64
    vae_slicing: bool = False
    fast_paths: bool = True
    compile: bool = False
    cuda_graphs: bool = False
    hash_files: bool = True
    trust_config: bool = False

    def __post_init__(self) -> None:
        if self.offload not in (None, *OFFLOAD_MODES):
            raise UsageError(f"offload {self.offload!r} is not one of {', '.join(OFFLOAD_MODES)}")


@dataclass
class Setup:
    """A checked pipeline that is not loaded yet: the checkpoint, its config, the device and dtype, the add-ons."""

    ckpt: str
    config_path: Path
    config: Any
    device: torch.device
    dtype: torch.dtype
    options: Options
    addons: list[AddOn]
    note: Report = _ignore
    info: Report = _ignore
    skeleton: torch.nn.Module | None = None  # the model with its parameters on the meta device, to check add-ons


@dataclass
class Result:
    """What one call made: uint8 `pixels` [B, H, W, 3] (`images` as PIL), the `latents` [B, C, h, w] they were
    decoded from, one `records` entry per image, and where the time went."""

    pixels: np.ndarray
    latents: torch.Tensor
    records: list[ImageRecord]
    steps: int = 0
    sampling_seconds: float = 0.0
    decoding_seconds: float = 0.0

    @property
    def images(self) -> list[Any]:
        from PIL import Image

        return [Image.fromarray(pixels) for pixels in self.pixels]

    @classmethod
    def join(cls, parts: Sequence["Result"]) -> "Result":
        """The parts of a batch made in sub-batches, as one result."""
        if len(parts) == 1:
            return parts[0]
        return cls(np.concatenate([part.pixels for part in parts]), torch.cat([part.latents for part in parts]),
                   [record for part in parts for record in part.records], sum(part.steps for part in parts),
                   sum(part.sampling_seconds for part in parts), sum(part.decoding_seconds for part in parts))


def _sampling_addon(addons: Sequence[AddOn]) -> AddOn | None:
    sampling = [addon for addon in addons if addon.samples]
    if len(sampling) > 1:
        names = " and ".join(type(addon).__name__ for addon in sampling)
        raise UsageError(f"{names} each decide how the latents are made: use one of them")
    return sampling[0] if sampling else None


class Pipeline:
    """A loaded model and its add-ons; call it with a `Request`."""

    def __init__(self, setup: Setup, model: torch.nn.Module, load_seconds: dict[str, float]):
        self.setup, self.model, self.load_seconds = setup, model, load_seconds
        self.models = [model]  # every model whose text encoders read the prompts (a refiner adds its own)
        self.options, self.device, self.dtype = setup.options, setup.device, setup.dtype
        self.addons = setup.addons
        self.sampling_addon = _sampling_addon(self.addons)
        self.note, self.info = setup.note, setup.info
        self.defaults = model_defaults(setup.config, setup.ckpt)
        self.default_size = _default_size(setup)  # (height, width) of a request that gives none
        self.model_name = Path(setup.ckpt).stem
        self.stage = "sampling"  # or "decoding": what ran out of memory, for the advice
        self.applied: list[str] = []  # the fast paths applied
        self._hashing: Future | None = None

    # --- making one ------------------------------------------------------------------------------------------------
    @classmethod
    def from_checkpoint(cls, path: str, config: str | None = None, device: str | None = None,
                        precision: str | None = None, *, addons: Sequence[AddOn] = (), note: Report = _ignore,
                        info: Report = _ignore, **options: Any) -> "Pipeline":
        """Check, then load: `options` are `Options` fields (offload="model", vae_tiling=True, ...)."""
        return cls.load(cls.check(path, config, device, precision, addons=addons, note=note, info=info,
                                  options=Options(**options)))

    @classmethod
    def check(cls, ckpt: str, config: str | None = None, device: str | None = None, precision: str | None = None,
              *, addons: Sequence[AddOn] = (), requests: Sequence[Request] = (), options: Options = Options(),
              note: Report = _ignore, info: Report = _ignore) -> Setup:
        """Everything that can go wrong before the weights are read, checked: UsageError (one line) otherwise."""
        try:
            chosen = choose_device(device)
            dtype, precision_note = choose_dtype(precision or "autocast", chosen)
        except ValueError as error:
            raise UsageError(str(error)) from None
        if precision_note and precision is not None:
            note(precision_note)
        config_path = resolve_config(ckpt, config, options.v_prediction, unet=options.unet)
        setup = Setup(str(ckpt), config_path, load_config(config_path, options.trust_config), chosen, dtype, options,
                      list(addons), note, info)
        sampling = _sampling_addon(setup.addons)
        if sampling is not None:
            sampling.check_model_kind(setup.config, setup.ckpt)
        else:
            refuse_special_models(setup.config, setup.ckpt)
        requests = [_with_size(request, _default_size(setup)) for request in requests]
        # the checkpoint (with the vae and unet) must load with its config: checked on shapes only, nothing read
        setup.skeleton = check_loadable(ckpt, config_path, use_ema=options.use_ema,
                                        v_prediction=options.v_prediction, vae=options.vae, unet=options.unet,
                                        trust_config=options.trust_config)
        check_against_model(requests, setup.config)
        if prompt_lora_tags(requests) and not any(isinstance(addon, Loras) for addon in setup.addons):
            raise UsageError("the prompts name <lora:...> tags but the pipeline has no Loras add-on to merge them: "
                             "make it with Loras(tags=prompt_lora_tags(requests), folder=...)")
        for addon in setup.addons:
            addon.check(setup, requests)
        _check_speed_options(setup)
        _check_memory(setup, requests)
        if any(request.clip_skip > 1 and not clip_skip_encoders(setup.skeleton, request.clip_skip_sdxl)
               for request in requests):
            note("this model ignores clip skip, as AUTOMATIC1111 does for SD 2.x and SDXL: the images are the same "
                 "as without it")
        embeddings = [addon for addon in setup.addons if isinstance(addon, Embeddings)]
        for message in prompt_notes(requests, embeddings[0].tokenizer if embeddings else None):
            note(message)
        return setup

    @classmethod
    def load(cls, setup: Setup) -> "Pipeline":
        """Read the weights, apply the add-ons and the speed and memory options."""
        options, device = setup.options, setup.device
        offload = options.offload if device.type != "cpu" else None
        if options.offload and offload is None:
            setup.note("--offload has no effect on the CPU: the weights already live in CPU memory")
        setup.info(f"Loading model from {setup.ckpt} (config {setup.config_path})")
        timings: dict[str, float] = {}
        model = load_model(setup.ckpt, setup.config_path, device="cpu" if offload else device, dtype=setup.dtype,
                           use_ema=options.use_ema, v_prediction=options.v_prediction, vae=options.vae,
                           unet=options.unet, timings=timings, trust_config=options.trust_config)
        pipeline = cls(setup, model, timings)
        for addon in setup.addons:
            addon.change_weights(pipeline)
        pipeline._apply_speed_and_memory_options(offload)
        for addon in sorted(setup.addons, key=lambda addon: addon.load_order):
            addon.load(pipeline)
        if options.hash_files:  # hashed beside the sampling (hashlib releases the GIL); the first record waits
            executor = ThreadPoolExecutor(1, thread_name_prefix="model-hash")
            pipeline._hashing = executor.submit(checkpoint_hash, setup.ckpt)
            executor.shutdown(wait=False)
        return pipeline

    def _apply_speed_and_memory_options(self, offload: str | None) -> None:
        options, model = self.options, self.model
        # fused projections, and on the CPU oneDNN kernels and channels-last: same results to float rounding
        self.applied = optimize.apply_fast_paths(model, self.device) if options.fast_paths else []
        if options.attention_slicing:
            optimize.enable_attention_slicing(model)
        if options.vae_tiling:
            optimize.enable_vae_tiling(model, tile=options.vae_tile)
        if options.vae_slicing:
            optimize.enable_vae_slicing(model)
        if offload == "model":
            optimize.enable_model_offload(model, self.device)
        elif offload == "sequential":
            optimize.enable_sequential_offload(model, self.device)
        if options.compile:
            optimize.compile_model(model)
        if options.cuda_graphs:
            optimize.enable_graphs(model)

    @property
    def model_hash(self) -> str:
        """The checkpoint's hash for the metadata ("" without `hash_files`), once the background hashing is done."""
        return self._hashing.result() if self._hashing is not None else ""

    # --- generating ------------------------------------------------------------------------------------------------
    def complete(self, request: Request) -> Request:
        """`request` with the default size where it gives none (the sampling add-on's, else the model's own),
        checked against the model."""
        request = _with_size(request, self.default_size)
        check_against_model([request], self.setup.config)
        loras = [addon for addon in self.addons if isinstance(addon, Loras)]
        if loras:
            loras[0].check_tags([request])
        elif prompt_lora_tags([request]):
            raise UsageError("the prompt names <lora:...> tags but this pipeline has no Loras add-on to merge them")
        return request

    def __call__(self, request: Request) -> Result:
        """The images of `request`; a batch that runs out of memory is made again in halves (same pixels)."""
        request = self.complete(request)
        height, width = request.size

        def run(indices: list[int]) -> Result:
            return self.render(request if len(indices) == request.batch_size else request.subset(indices))

        def on_retry(size_now: int, half: int) -> None:
            free_accelerator_memory(self.device)
            self.note(f"out of memory with a batch of {size_now}: retrying in sub-batches of {half}")

        def on_exhausted() -> str:
            return out_of_memory_advice(self.options, self.stage, self.device, self.dtype, f"{width}x{height}")

        return Result.join(run_in_sub_batches(run, list(range(request.batch_size)), on_retry, on_exhausted))

    def render(self, request: Request, warm_up: bool = False) -> Result:
        """The images of a completed `request`, in one batch; with `warm_up`, one DDIM step of the UNet only."""
        addon = self.sampling_addon
        sampler, steps, eta = (("ddim", addon.warm_up_steps() if addon else 1, 0.0) if warm_up
                               else (request.sampler, request.steps, request.eta))
        start = time.perf_counter()
        self.stage = "sampling"
        with torch.no_grad():
            cond, uncond = self.conditioning(request)
            latents, steps = self.sample_latents(SampleCall(request, cond, uncond, sampler, steps, eta, warm_up))
            torch.isfinite(latents).all().item()  # waits for the device, so the time below is the sampling time
            sampled = time.perf_counter()
            self.stage = "decoding"
            pixels = decode_to_pixels(self.model, latents, self.note)
        records = [] if warm_up else [self.record(request, index) for index in range(request.batch_size)]
        return Result(pixels, latents, records, steps, sampled - start, time.perf_counter() - sampled)

    def conditioning(self, request: Request, model: Any = None) -> tuple[Any, Any]:
        """(prompts, negative prompts) conditioning of `model` (default: the pipeline's), with the request's clip
        skip; no negative half without guidance. SDXL models also take the image size (their size conditioning)
        and make an empty negative prompt zeros, as diffusers does. A latent consistency model with embedded
        guidance gets the scale as its UNet's input and no negative half (`with_embedded_guidance`)."""
        model = self.model if model is None else model
        width = embedded_guidance_width(model)
        text = request.replace(scale=1.0) if width else request  # an embedded-guidance LCM takes no negative pass
        if request.clip_skip > 1 or request.clip_skip_sdxl:
            with use_clip_skip(model, request.clip_skip, request.clip_skip_sdxl):
                cond, uncond = self.encode(text, model)
        else:
            cond, uncond = self.encode(text, model)
        return (with_embedded_guidance(cond, request.scale, width), None) if width else (cond, uncond)

    def encode(self, request: Request, model: Any) -> tuple[Any, Any]:
        """`conditioning` with the text encoders as they are set."""
        # extra-network tags (<lora:...>) are not text; AUTOMATIC1111 reads them in the prompt only, not the negative
        prompts = [strip_extra_networks(prompt) for prompt in request.prompts]
        negatives = list(request.negative_prompts)
        guided = request.scale != 1.0
        size = {"original_size": request.size, "target_size": request.size}
        sdxl = hasattr(model, "get_unconditional_conditioning")
        if request.prompt_weighting:
            return weighted_conditioning(model, prompts, negatives if guided else None, **(size if sdxl else {}))
        if not sdxl:
            uncond = model.get_learned_conditioning(negatives) if guided else None
            return model.get_learned_conditioning(prompts), uncond
        uncond = model.get_unconditional_conditioning(negatives, **size) if guided else None
        return model.get_learned_conditioning(prompts, **size), uncond

    def sample_latents(self, call: SampleCall) -> tuple[torch.Tensor, int]:
        """The batch's latents (by the sampling add-on, or from noise), and the sampler steps that ran."""
        for addon in self.addons:
            addon.before_sampling(self, call.request)
        if self.sampling_addon is not None:
            made = self.sampling_addon.sample(self, call)
            if made is not None:
                return made
        request = call.request
        spacing = compvis_spacing(call.sampler, request.scheduler) if call.sampler == request.sampler else None
        if spacing is not None:  # DDIM / PLMS: the schedule type is a spacing of their timesteps
            latents = sample(self.model, call.sampler, call.steps, self.latent_shape(request), call.cond,
                             call.uncond, request.scale, self.noise(request), eta=call.eta, ddim_discretize=spacing)
            return latents, call.steps
        latents = sample(self.model, call.sampler, call.steps, self.latent_shape(request), call.cond, call.uncond,
                         request.scale, self.noise(request), eta=call.eta,
                         sigmas=self.sigmas(request, call.sampler, call.steps))
        return latents, call.steps

    @cached_property
    def schedule(self) -> NoiseSchedule:
        """The model's noise schedule, which AUTOMATIC1111's schedule types read their sigma range from."""
        return NoiseSchedule(self.model.alphas_cumprod)

    @cached_property
    def lcm_schedule(self) -> NoiseSchedule:
        """The 50 noise levels an LCM was distilled on, which AUTOMATIC1111's LCM sampler reads its schedule types
        off (its `LCMCompVisDenoiser` is the "inner model" they see)."""
        return LCMCompVisDenoiser(self.model).lcm_schedule

    def sigmas(self, request: Request, sampler: str, steps: int) -> torch.Tensor | None:
        """AUTOMATIC1111's sigmas for the request's schedule type (None: the sampler's own schedule)."""
        if request.scheduler is None or sampler != request.sampler:  # a warm-up's DDIM has none
            return None
        schedule = self.schedule
        if resolve_sampler(sampler).name == "lcm" and is_a1111_schedule_type(request.scheduler):
            schedule = self.lcm_schedule  # diffusers' spacings (Trailing, LCM, ...) are of the model's timesteps
        return a1111_sigmas(sampler_display_name(sampler), steps, schedule, request.scheduler).to(self.device)

    def noise(self, request: Request, seeds: Sequence[int] | None = None) -> ImageNoise:
        """The per-image noise of `request` (of `seeds` alone, without the request's variation, when given)."""
        if seeds is not None:
            return ImageNoise(seeds, rng=request.rng)
        width, height = request.seed_resize_from or (0, 0)
        return ImageNoise(request.seeds, rng=request.rng, ensd=request.ensd, subseeds=request.subseeds,
                          subseed_strength=request.subseed_strength, seed_resize_from_w=width,
                          seed_resize_from_h=height, downsampling=self.defaults["f"])

    def latent_shape(self, request: Request) -> tuple[int, int, int, int]:
        """[B, C, h, w] of a completed request's latents."""
        height, width = request.size
        f = self.defaults["f"]
        return request.batch_size, self.defaults["C"], height // f, width // f

    def record(self, request: Request, index: int) -> ImageRecord:
        """The metadata of image `index` of `request`: its settings, the model's identity, the add-ons' fields."""
        height, width = request.size
        fields: dict[str, Any] = {"model": self.model_name, "model_hash": self.model_hash,
                                  "vae": Path(self.options.vae).name if self.options.vae else None,
                                  "unet": Path(self.options.unet).name if self.options.unet else None,
                                  "prompt_weighting": request.prompt_weighting}
        extras = request_fields(request, index)
        for addon in self.addons:
            contributed = dict(addon.record(request, index))
            extras.extend(contributed.pop("extras", ()))
            fields.update(contributed)
        return ImageRecord(prompt=request.prompts[index], negative_prompt=request.negative_prompts[index],
                           steps=request.steps, sampler=request.sampler, scale=request.scale,
                           seed=request.seeds[index], H=height, W=width, eta=request.eta, extras=tuple(extras),
                           **fields)

    def warm_up(self, requests: Sequence[Request]) -> float:
        """With compile or CUDA graphs, compile/capture once per batch shape of `requests` (one sampler step and a
        decode each); returns the seconds it took (0 when neither option is on)."""
        if not (self.options.compile or self.options.cuda_graphs):
            return 0.0
        start = time.perf_counter()
        shapes: dict[tuple, Request] = {}
        for request in map(self.complete, requests):
            shapes.setdefault((request.batch_size, *request.size, request.scale != 1.0), request)
        for request in shapes.values():
            self.render(request, warm_up=True)
        return time.perf_counter() - start


def _default_size(setup: Setup) -> tuple[int, int]:
    """(height, width) of a request that gives none: what the sampling add-on makes, else the model's own size."""
    sampling = _sampling_addon(setup.addons)
    size = sampling.default_size(setup.config) if sampling is not None else None
    if size is not None:
        return size
    defaults = model_defaults(setup.config, setup.ckpt)
    return defaults["H"], defaults["W"]


def _with_size(request: Request, size: tuple[int, int]) -> Request:
    if request.height is not None and request.width is not None:
        return request
    return request.replace(height=request.height or size[0], width=request.width or size[1])


def _check_speed_options(setup: Setup) -> None:
    options = setup.options
    if options.cuda_graphs and setup.device.type != "cuda":
        raise UsageError(f"--cuda_graphs needs a CUDA GPU (the device is {setup.device}): leave it out")
    if options.cuda_graphs and options.offload:
        raise UsageError(f"--cuda_graphs replays the UNet with its weights in place, which --offload "
                         f"{options.offload} moves: use one of them")


def _check_memory(setup: Setup, requests: Sequence[Request]) -> None:
    """Refuse before loading what cannot fit: on a GPU the weights alone, then (GPU and CPU RAM) each request's
    weights and activations, naming the flag that makes it fit."""
    try:
        part_bytes = weight_bytes_by_part(checkpoint_shapes(setup.ckpt), setup.dtype)
    except (CheckpointError, LoadError):
        return  # the loader reports an unreadable file in its own words
    memory = accelerator_memory(setup.device)
    if memory is not None:
        check_weights_fit(part_bytes, *memory, setup.options.offload, setup.device, setup.dtype)
    weights = resident_weight_bytes(part_bytes, setup.options.offload, setup.device)
    check_request_memory(setup.config, requests, setup.options, setup.device, setup.dtype, weights)
