"""`scripts/txt2img.py`: check everything, load the model once, sample batch by batch, save numbered images."""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ldm.cli.arguments import UsageError, check_counts, lora_specs, parse_args
from ldm.cli.generation import (GenerationError, black_images, decode_to_pixels, free_accelerator_memory,
                                run_in_sub_batches)
from ldm.cli.images import MissingDependency, Watermarker, make_grid
from ldm.cli.metadata import ImageRecord, check_made_by, encode_png, parameters_text, sidecar_text
from ldm.cli.outputs import (GRID_DIGITS, SAMPLE_DIGITS, next_grid_number, next_sample_number, replace_file,
                             write_new_file)
from ldm.cli.plan import (PlannedImage, RunPlan, apply_compat_flags, check_against_model, check_files,
                          fill_model_defaults, plan_batches, read_jobs)
from ldm.cli.prompts import truncation_notes, weighting_notes
from ldm.cli.summary import RunSummary

PROG = "txt2img.py"


class Run:
    """One checked run: the options, its plan, and the optional helpers (all set up before the model loads).

    Subclasses (img2img) change how a batch's latents are made (`sample_latents`), what a saved image records
    (`record`, `record_type`), and check their plan (`make_plan`); the rest of a run is shared.
    """

    prog = PROG
    record_type = ImageRecord

    def __init__(self, opt: argparse.Namespace):
        from ldm.devices import choose_device, choose_dtype
        from ldm.loading import load_config, resolve_config

        started = time.perf_counter()
        apply_compat_flags(opt)
        fill_model_defaults(opt, self.peek_config(opt))
        check_counts(opt)
        self.opt = opt
        self.plan: RunPlan = self.make_plan(opt)
        if opt.metadata_from:
            try:
                check_made_by(self.plan.source_info, opt.metadata_from, self.prog)
            except ValueError as error:
                raise UsageError(str(error)) from None
        check_files(opt)
        self.loras = lora_specs(opt.lora)
        from ldm.cli.embeddings import RunEmbeddings
        self.embeddings = RunEmbeddings(opt.embeddings)
        try:
            self.device = choose_device(opt.device)
            self.dtype, precision_note = choose_dtype(opt.precision, self.device)
        except ValueError as error:
            raise UsageError(str(error)) from None
        if precision_note:
            self.note(precision_note)
        self.config_path = resolve_config(opt.ckpt, opt.config, opt.v_prediction or None)
        config = load_config(self.config_path)
        self.check_model_kind(config)
        self.check_weights_fit()
        check_against_model(opt, self.plan, config)
        from ldm.cli.refiner import Refiner, RefinerRecord
        self.refiner = Refiner.from_flags(opt, self.plan)  # --refiner: checked here, loaded beside the model
        if self.refiner is not None:
            self.record_type = RefinerRecord
        elif opt.metadata_from and self.plan.source_info.get("refiner"):
            self.note(f"{opt.metadata_from} was finished by the refiner {self.plan.source_info['refiner']}: pass "
                      f"--refiner with that file to make the same image (its switch is taken from the metadata)")
        from ldm.cli.controlnet import ControlNetRecord, ControlNetRun
        # --controlnet: checked here, loaded beside the model
        self.controlnet = ControlNetRun.from_flags(opt, self.prog, self.plan.source_info, self.note)
        if self.controlnet is not None:
            self.record_type = ControlNetRecord
        self.check_speed_flags()
        self.check_memory()
        texts = [text for image in self.plan.images for text in (image.prompt, image.negative_prompt)]
        if opt.metadata_from and self.plan.source_info.get("prompt_weighting"):
            opt.prompt_weighting = True  # the recorded image read its prompts with weights
        try:
            notes = weighting_notes(texts, opt.prompt_weighting)
        except ValueError as error:
            raise UsageError(str(error)) from None
        if not opt.prompt_weighting:  # weighted prompts are encoded in chunks, so nothing is cut
            notes = truncation_notes(texts, tokenizer=self.embeddings.tokenizer) + notes
        for message in notes:
            self.note(message)
        self.watermarker = Watermarker() if opt.watermark else None
        self.safety_checker = None
        if opt.safety_checker:
            from ldm.cli.safety import SafetyChecker
            try:
                self.safety_checker = SafetyChecker(opt.safety_checker)
            except (OSError, ValueError) as error:
                raise UsageError(f"--safety_checker {opt.safety_checker} cannot be loaded: "
                                 f"{str(error).strip().splitlines()[0]}") from None
        self.summary = RunSummary(self.device, self.dtype, started=started)
        self.sample_dir = Path(opt.outdir) / "samples"
        self.next_sample: int | None = None  # found when the first image is saved: nothing is written before
        self.saved: list[Path] = []
        self.watermark_failed = False
        self.stage = "sampling"  # or "decoding": what ran out of memory, for the advice

    def check_weights_fit(self) -> None:
        """The checkpoint (with --vae) must load with its config, and every --lora and --embeddings fit the model:
        checked on the model built without weights (shapes only), so no such mistake waits until the weights load."""
        from ldm.loading import check_loadable
        from ldm.lora import LoraError, check_lora

        opt = self.opt
        skeleton = check_loadable(opt.ckpt, opt.config, use_ema=True if opt.ema else None,
                                  v_prediction=opt.v_prediction or None, vae=opt.vae)
        for path, _ in self.loras:
            try:
                check_lora(skeleton, path)
            except LoraError as error:
                raise UsageError(f"--lora {path}: {error}") from None
        self.embeddings.check(skeleton)

    def check_speed_flags(self) -> None:
        opt = self.opt
        if opt.cuda_graphs and self.device.type != "cuda":
            raise UsageError(f"--cuda_graphs needs a CUDA GPU (the device is {self.device}): leave it out")
        if opt.cuda_graphs and opt.offload:
            raise UsageError(f"--cuda_graphs replays the UNet with its weights in place, which --offload {opt.offload} "
                             f"moves: use one of them")

    def check_memory(self) -> None:
        """On a GPU, refuse before loading when the weights alone cannot fit, naming the flag that makes them fit."""
        from ldm.checkpoints import CheckpointError, read_shapes
        from ldm.cli.memory import check_weights_fit, weight_bytes_by_part
        from ldm.devices import accelerator_memory

        memory = accelerator_memory(self.device)
        if memory is None:
            return
        try:
            shapes = read_shapes(self.opt.ckpt)
        except CheckpointError:
            return  # the loader reports an unreadable file in its own words
        check_weights_fit(weight_bytes_by_part(shapes, self.dtype), *memory, self.opt.offload, self.device,
                          self.dtype)

    def check_model_kind(self, config: Any) -> None:
        """Text to image (and img2img) need a text-to-image model: inpainting models also take a mask."""
        from ldm.cli.plan import is_inpainting_config, refuse_upscaler

        refuse_upscaler(config, self.opt.ckpt)
        if is_inpainting_config(config):
            raise UsageError(f"{self.opt.ckpt} is an inpainting model (its UNet also takes a mask and the masked "
                             f"image): use scripts/inpaint.py --init-img IMAGE --mask MASK")

    def note(self, message: str) -> None:
        print(f"{self.prog}: note: {message}", file=sys.stderr, flush=True)

    def make_plan(self, opt: argparse.Namespace) -> RunPlan:
        return plan_batches(opt, read_jobs(opt))

    @staticmethod
    def peek_config(opt: argparse.Namespace) -> Any | None:
        """The model's config when the checkpoint can be read already; problems are reported in their turn later."""
        from ldm.loading import LoadError, load_config, resolve_config

        if not os.path.isfile(opt.ckpt):
            return None
        try:
            return load_config(resolve_config(opt.ckpt, opt.config, opt.v_prediction or None))
        except LoadError:
            return None

    # --- model -----------------------------------------------------------------------------------------------------
    def load(self) -> None:
        from ldm.loading import load_model

        opt = self.opt
        print(f"Loading model from {opt.ckpt} (config {self.config_path})", flush=True)
        offload = opt.offload if self.device.type != "cpu" else None
        if opt.offload and offload is None:
            self.note("--offload has no effect on the CPU: the weights already live in CPU memory")
        self.model = load_model(opt.ckpt, opt.config, device="cpu" if offload else self.device, dtype=self.dtype,
                                use_ema=True if opt.ema else None, v_prediction=opt.v_prediction or None,
                                vae=opt.vae, timings=self.summary.load)
        self.apply_loras()
        self.apply_embeddings()
        self.apply_speed_and_memory_flags(offload)
        if self.refiner is not None:
            self.refiner.load(self.device, self.dtype)
            self.embeddings.load_into(self.refiner.model)
        if self.controlnet is not None:
            self.controlnet.load(self.device, self.dtype, with_hashes=not opt.no_metadata)
        self.model_name = Path(opt.ckpt).stem
        if not opt.no_metadata:  # hashed beside the sampling (hashlib releases the GIL); the first save waits for it
            from concurrent.futures import ThreadPoolExecutor
            from ldm.checkpoints import model_hash
            pool = ThreadPoolExecutor(1, thread_name_prefix="model-hash")
            self.hashing = pool.submit(model_hash, opt.ckpt)
            pool.shutdown(wait=False)  # the thread ends when the hash is done
        recorded = self.plan.source_info.get("model_hash")
        if recorded and self.model_hash and recorded != self.model_hash:
            self.note(f"{opt.metadata_from} was made with model hash {recorded}, this checkpoint is {self.model_hash}: "
                      f"the image will differ")

    @property
    def model_hash(self) -> str:
        """The checkpoint's hash for the metadata ("" with --no_metadata), once the background hashing is done."""
        hashing = getattr(self, "hashing", None)
        return hashing.result() if hashing is not None else ""

    def apply_loras(self) -> None:
        """Merge each --lora into the weights (before the fast paths fuse the projections a LoRA names)."""
        from ldm.lora import LoraError, apply_lora

        for path, weight in self.loras:
            try:
                layers = apply_lora(self.model, path, multiplier=weight)
            except LoraError as error:
                raise UsageError(f"--lora {path}: {error}") from None
            print(f"LoRA {path}: {layers} layers, weight {weight:g}", flush=True)
        self.lora_text = ", ".join(f"{Path(path).stem}:{weight:g}" for path, weight in self.loras) or None
        recorded = self.plan.source_info.get("lora")
        if self.opt.metadata_from and recorded != self.lora_text:
            self.note(f"{self.opt.metadata_from} was made with LoRA {recorded or 'none'}, this run uses "
                 f"{self.lora_text or 'none'}: the image will differ")

    def apply_embeddings(self) -> None:
        """Give the text encoders each --embeddings vector set; note recorded embeddings this run lacks."""
        self.embeddings.load_into(self.model)
        if self.embeddings.embeddings:
            print(f"Embeddings: {self.embeddings.summary()}", flush=True)
        missing = self.embeddings.missing(self.plan.source_info.get("embeddings"))
        if self.opt.metadata_from and missing:
            self.note(f"{self.opt.metadata_from} was made with the embeddings {', '.join(missing)}, which this run "
                      f"does not load (--embeddings): the image will differ")

    def apply_speed_and_memory_flags(self, offload: str | None) -> None:
        from ldm import optimize

        opt, model = self.opt, self.model
        # fused projections, and on the CPU oneDNN kernels and channels-last: same results to float rounding
        optimize.apply_fast_paths(model, self.device)
        if opt.attention_slicing:
            optimize.enable_attention_slicing(model)
        if opt.vae_tiling:
            optimize.enable_vae_tiling(model)
        if opt.vae_slicing:
            optimize.enable_vae_slicing(model)
        if offload == "model":
            optimize.enable_model_offload(model, self.device)
        elif offload == "sequential":
            optimize.enable_sequential_offload(model, self.device)
        if opt.compile:
            optimize.compile_model(model)
        if opt.cuda_graphs:
            optimize.enable_graphs(model)

    def warm_up(self) -> None:
        """With --compile or --cuda_graphs, compile/capture for each batch shape of the plan before the first batch,
        with one sampler step and a decode, so the summary shows that cost apart from the per-image times."""
        if not (self.opt.compile or self.opt.cuda_graphs):
            return
        start = time.perf_counter()
        shapes = {}
        for batch in self.plan.batches:
            settings = batch[0].settings
            shapes.setdefault((len(batch), settings["H"], settings["W"], settings["scale"] != 1.0), batch)
        for batch in shapes.values():
            self.render_exactly(batch, warm_up=True)
        self.summary.warm_up = time.perf_counter() - start

    # --- sampling --------------------------------------------------------------------------------------------------
    def render(self, batch: list[PlannedImage]) -> np.ndarray:
        """Pixels of `batch`, split into smaller sub-batches if memory runs out."""
        settings = batch[0].settings
        size = f"{settings['W']}x{settings['H']}"

        def on_retry(size_now: int, half: int) -> None:
            free_accelerator_memory(self.device)
            self.note(f"out of memory with a batch of {size_now}: retrying in sub-batches of {half}")

        def on_exhausted() -> str:
            from ldm.cli.memory import out_of_memory_advice
            return out_of_memory_advice(self.opt, self.stage, self.device, self.dtype, size)

        return run_in_sub_batches(self.render_exactly, batch, on_retry, on_exhausted)

    def warm_up_steps(self) -> int:
        """DDIM steps for a warm-up that runs the UNet once."""
        return 1

    def render_exactly(self, batch: list[PlannedImage], warm_up: bool = False) -> np.ndarray:
        """Pixels of `batch`; with `warm_up`, only one DDIM step, and nothing counted in the summary."""
        settings, model = batch[0].settings, self.model
        sampler, steps, eta = (("ddim", self.warm_up_steps(), 0.0) if warm_up
                               else (settings["sampler"], settings["steps"], settings["eta"]))
        start = time.perf_counter()
        self.stage = "sampling"
        with torch.no_grad():
            cond, uncond = self.conditioning(batch)
            latents, steps = self.sample_latents(batch, cond, uncond, sampler, steps, eta)
            torch.isfinite(latents).all().item()  # waits for the device, so the time below is the sampling time
            sampled = time.perf_counter()
            self.stage = "decoding"
            pixels = decode_to_pixels(model, latents, self.note)
        if not warm_up:
            self.summary.add_batch(len(batch), steps, sampled - start, time.perf_counter() - sampled)
        return pixels

    def conditioning(self, batch: list[PlannedImage], model: Any = None) -> tuple[Any, Any]:
        """(prompts, negative prompts) conditioning of `model` (default: the run's); no negative half without
        guidance. SDXL models also take the image size (their size conditioning) and make an empty negative prompt
        zeros, as diffusers does."""
        settings, model = batch[0].settings, self.model if model is None else model
        prompts, negatives = [image.prompt for image in batch], [image.negative_prompt for image in batch]
        size = {"original_size": (settings["H"], settings["W"]), "target_size": (settings["H"], settings["W"])}
        if self.opt.prompt_weighting:
            from ldm.modules.encoders.prompt_weighting import weighted_conditioning
            return weighted_conditioning(model, prompts, negatives if settings["scale"] != 1.0 else None,
                                         **(size if hasattr(model, "get_unconditional_conditioning") else {}))
        if not hasattr(model, "get_unconditional_conditioning"):
            uncond = model.get_learned_conditioning(negatives) if settings["scale"] != 1.0 else None
            return model.get_learned_conditioning(prompts), uncond
        uncond = model.get_unconditional_conditioning(negatives, **size) if settings["scale"] != 1.0 else None
        return model.get_learned_conditioning(prompts, **size), uncond

    def sample_latents(self, batch: list[PlannedImage], cond: Any, uncond: Any, sampler: str, steps: int,
                       eta: float | None) -> tuple[torch.Tensor, int]:
        """The batch's latents from noise, and the number of sampler steps that ran (for the summary)."""
        from ldm.models.diffusion.noise import ImageNoise
        from ldm.models.diffusion.samplers import sample

        settings = batch[0].settings
        shape = (len(batch), self.opt.C, settings["H"] // self.opt.f, settings["W"] // self.opt.f)
        if self.controlnet is not None:
            self.controlnet.attach(self.model, settings["H"], settings["W"])
        if self.refiner is not None and sampler == settings["sampler"]:  # not in the DDIM warm-up
            refiner_conditioning = self.conditioning(batch, self.refiner.model)
            latents = self.refiner.sample(self.model, shape, (cond, uncond), refiner_conditioning, sampler, steps,
                                          settings["scale"], ImageNoise([image.seed for image in batch]), eta)
            return latents, steps
        latents = sample(self.model, sampler, steps, shape, cond, uncond, settings["scale"],
                         ImageNoise([image.seed for image in batch]), eta=eta)
        return latents, steps

    # --- saving ----------------------------------------------------------------------------------------------------
    def record(self, image: PlannedImage) -> ImageRecord:
        settings = image.settings
        record = ImageRecord(prompt=image.prompt, negative_prompt=image.negative_prompt, steps=settings["steps"],
                             sampler=settings["sampler"], scale=settings["scale"], seed=image.seed, H=settings["H"],
                             W=settings["W"], eta=settings["eta"], model=self.model_name, model_hash=self.model_hash,
                             vae=Path(self.opt.vae).name if self.opt.vae else None, lora=self.lora_text,
                             embeddings=None if self.opt.no_metadata else
                             self.embeddings.record_text((image.prompt, image.negative_prompt)),
                             prompt_weighting=self.opt.prompt_weighting)
        if self.controlnet is not None:
            return self.controlnet.record(record)
        return self.refiner.record(record) if self.refiner is not None else record

    def finish_pixels(self, pixels: np.ndarray) -> tuple[np.ndarray, list[bool]]:
        """Safety checker (flagged images become black) and watermark; returns the pixels and the flags."""
        flagged = self.safety_checker.flags(list(pixels)) if self.safety_checker else [False] * len(pixels)
        pixels = pixels.copy()
        for index, flag in enumerate(flagged):
            if flag:
                pixels[index] = 0
        if self.watermarker is not None:
            for index in range(len(pixels)):
                try:
                    pixels[index] = self.watermarker.apply(pixels[index])
                except Exception as error:  # noqa: BLE001 - e.g. images under 256x256, which DWT-DCT refuses
                    if not self.watermark_failed:
                        self.note(f"the watermark could not be added ({error}); images are saved without it")
                    self.watermark_failed = True
        return pixels, flagged

    def save_sample(self, pixels: np.ndarray, image: PlannedImage) -> Path:
        record = self.record(image)
        metadata = None if self.opt.no_metadata else parameters_text(record)
        if self.next_sample is None:
            self.next_sample = next_sample_number(self.sample_dir)
        path, number = write_new_file(self.sample_dir, f"{{:0{SAMPLE_DIGITS}d}}.png", self.next_sample,
                                      encode_png(pixels, metadata))
        self.next_sample = number + 1
        if metadata is not None:  # the PNG holds the number, so the sidecar of that number is this run's
            replace_file(path.with_suffix(".yaml"), sidecar_text(record.to_mapping()).encode("utf-8"))
        self.saved.append(path)
        return path

    def save_grid(self, grid_images: list[np.ndarray], records: list[dict[str, Any]]) -> Path:
        outdir = Path(self.opt.outdir)
        per_row = self.opt.n_rows if self.opt.n_rows > 0 else self.opt.n_samples
        first = self.record_type.from_mapping(records[0])
        metadata = None if self.opt.no_metadata else parameters_text(first)
        path, number = write_new_file(outdir, f"grid-{{:0{GRID_DIGITS}d}}.png", next_grid_number(outdir),
                                      encode_png(make_grid(grid_images, per_row), metadata))
        if metadata is not None:
            replace_file(path.with_suffix(".yaml"), sidecar_text({"images": records}).encode("utf-8"))
        return path

    # --- the run ---------------------------------------------------------------------------------------------------
    def generate(self) -> None:
        from tqdm import tqdm

        opt = self.opt
        grid_images: list[np.ndarray] = []
        records: list[dict[str, Any]] = []
        batches = iter(self.plan.batches)
        for iteration in tqdm(range(opt.n_iter), desc="Sampling", disable=opt.n_iter == 1):
            for _ in tqdm(range(self.plan.batches_per_iteration[iteration]), desc="data", leave=False):
                batch = next(batches)
                pixels, flagged = self.finish_pixels(self.render(batch))
                black = black_images(pixels)
                for image, image_pixels, was_flagged, is_black in zip(batch, pixels, flagged, black):
                    label = f"image {image.index} (seed {image.seed})"
                    entry = self.record(image).to_mapping()
                    if not opt.skip_save:
                        path = self.writing(self.save_sample, image_pixels, image)
                        label, entry["file"] = str(path), f"samples/{path.name}"
                    if was_flagged:
                        self.note(f"{label}: flagged by the safety checker, replaced by a black image")
                    elif is_black:
                        self.note(f"{label}: the model produced an entirely black image")
                    if not opt.skip_grid:
                        grid_images.append(image_pixels)
                        records.append(entry)
        if grid_images:
            self.saved.append(self.writing(self.save_grid, grid_images, records))

    def writing(self, save: Any, *args: Any) -> Path:
        """`save(*args)`, with a full disk or a read-only folder reported in one line (earlier files stay)."""
        try:
            return save(*args)
        except OSError as error:
            raise GenerationError(f"cannot write to {self.opt.outdir}: {error.strerror or error}; free some space "
                                  f"or pick another --outdir") from None


def main(argv: Sequence[str] | None = None, *, prog: str = PROG,
         parse: Callable[[Sequence[str] | None], argparse.Namespace] = parse_args, run_type: type[Run] = Run) -> int:
    """Run txt2img (or, with img2img's `prog`, `parse` and `run_type`, img2img) with command-line `argv`; returns the
    exit status (0 done, 1 failed, 2 bad input)."""
    from ldm.checkpoints import CheckpointError
    from ldm.loading import LoadError
    from ldm.cli.prompts import PromptFileError

    run = None
    try:
        opt = parse(argv)
        run = run_type(opt)
        run.load()
        run.warm_up()
        run.generate()
    except SystemExit as exit_request:  # --help
        return exit_request.code if isinstance(exit_request.code, int) else 0
    except (UsageError, LoadError, CheckpointError, PromptFileError, MissingDependency) as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 2
    except GenerationError as error:
        print(f"{prog}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        saved = len(run.saved) if run is not None else 0
        print(f"{prog}: interrupted; {saved} file(s) were saved completely, none partially", file=sys.stderr)
        return 130
    for line in run.summary.lines():
        print(line)
    print(f"Your samples are ready and waiting for you here: \n{run.opt.outdir} \n \nEnjoy.")
    return 0
