"""Benchmark this project against diffusers on the same weights, and its loader against the CompVis-style load.

    python scripts/benchmark.py                                  # CPU, fp32, 256x256, 20 DDIM steps, random weights
    python scripts/benchmark.py --ckpt sd-v1-5.safetensors --device cuda --precision fp16 --size 512 --steps 50
    python scripts/benchmark.py --compare-models sdxl ssd-1b vega --size 768    # UNet architectures, random weights

Without --ckpt a full-size random checkpoint in the config's layout is written to a temporary folder (deleted
afterwards), as .ckpt and .safetensors. Every load runs in a fresh process (so its peak RSS is its own), alternating
the CompVis-style load (torch.load, build with random init, load_state_dict) with this project's. Sampling runs
each pipeline in its own process, loaded once and warmed up, then alternates runs between them with the same
prompt, size, steps, DDIM sampler, guidance, precision and starting noise; medians are reported, and the images of
the two pipelines are compared to show they did the same work.

--compare-models replaces both: each named UNet (or the UNet of a config file) is built with random weights in a
fresh process, one after the other, and timed over --runs evaluations of a guided batch of 2 at --size, in
--precision on --device with the default fast paths; its parameters, weight memory, FLOPs per evaluation and the
ratios against the first model are reported.
"""
from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import platform
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "configs" / "stable-diffusion" / "v1-inference.yaml"
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--ckpt", help="checkpoint to use (default: write a full-size random one)")
    add("--config", default=str(DEFAULT_CONFIG), help="model config (default: %(default)s)")
    add("--size", type=int, default=256, help="image height and width in pixels (default: %(default)s)")
    add("--steps", type=int, default=20, help="DDIM steps (default: %(default)s)")
    add("--scale", type=float, default=7.5, help="classifier-free guidance scale (default: %(default)s)")
    add("--precision", choices=sorted(PRECISIONS), default="fp32")
    add("--device", default="cpu", help="cpu, cuda, cuda:N or mps (default: %(default)s)")
    add("--runs", type=int, default=3, help="measured runs per pipeline, alternating (default: %(default)s)")
    add("--warmup", type=int, default=1, help="unmeasured runs per pipeline first (default: %(default)s)")
    add("--load-runs", type=int, default=3, help="loads per loader and format, alternating (default: %(default)s)")
    add("--threads", type=int, default=None, help="torch CPU threads in every worker (default: torch's)")
    add("--prompt", default="a photograph of an astronaut riding a horse")
    add("--seed", type=int, default=42)
    add("--plain", action="store_true", help="also time this project without its fast paths")
    add("--compile", action="store_true", help="also time this project under torch.compile (warm-up reported)")
    add("--cuda-graphs", action="store_true",
        help="also time this project replaying captured CUDA graphs of the UNet (CUDA only; capture in the warm-up)")
    add("--memory-modes", action="store_true", help="also time each memory mode (peak memory per mode)")
    add("--skip-load", action="store_true", help="skip the load benchmark")
    add("--skip-sampling", action="store_true", help="skip the sampling benchmark")
    add("--skip-diffusers", action="store_true", help="do not run diffusers")
    add("--compare-models", nargs="+", metavar="MODEL",
        help=f"instead, time UNet evaluations of these architectures with random weights (one at a time, each in its "
             f"own process; guided batch of 2 at --size, --runs after --warmup) and report each against the first: "
             f"{', '.join(MODELS)} or a config's path")
    add("--workdir", help="where to write the random checkpoint (default: a temporary folder, deleted after)")
    add("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.size % 8 or args.size < 64:
        parser.error(f"--size must be a multiple of 8 and at least 64, got {args.size}")
    if args.cuda_graphs and not args.device.startswith("cuda"):
        parser.error(f"--cuda-graphs needs a CUDA device (--device cuda), got --device {args.device}")
    if args.runs < 1 or args.steps < 1:
        parser.error("--runs and --steps must be at least 1")
    if args.compare_models:
        unknown = [name for name in args.compare_models if not model_config_path(name).is_file()]
        if unknown:
            parser.error(f"--compare-models takes {', '.join(MODELS)} or config paths; not found: {', '.join(unknown)}")
        pipeline_only = [flag for flag, value in (("--ckpt", args.ckpt), ("--plain", args.plain),
                                                  ("--compile", args.compile), ("--cuda-graphs", args.cuda_graphs),
                                                  ("--memory-modes", args.memory_modes)) if value]
        if pipeline_only:
            parser.error(f"--compare-models times UNets alone, with the default fast paths: drop "
                         f"{', '.join(pipeline_only)}")
    return args


# --- checkpoints ----------------------------------------------------------------------------------------------------
def random_parameter(name: str, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    """A float32 value for parameter `name` that keeps activations in range through the deepest stacks: unit-gain
    matrices (std 1/sqrt(fan-in)), norm gains near 1 and small biases (1-D weights are norm gains in these models)."""
    value = torch.randn(shape, generator=generator)
    if len(shape) > 1:
        return value.mul_(math.prod(shape[1:]) ** -0.5)
    return value.mul_(0.1).add_(1.0 if name.endswith("weight") else 0.0)


def write_random_checkpoint(config_path: str, folder: Path, dtype: torch.dtype, seed: int = 0) -> dict[str, Path]:
    """Random weights in the config's full-size key layout, as .ckpt (Lightning-style) and .safetensors."""
    from safetensors.torch import save_file

    from ldm.loading import load_config, parameters_on_meta
    from ldm.util import instantiate_from_config

    with parameters_on_meta():
        model = instantiate_from_config(load_config(config_path).model)
    parameters = dict(model.named_parameters())
    generator = torch.Generator().manual_seed(seed)
    state_dict = {}
    for name, reference in model.state_dict().items():
        if name not in parameters:
            state_dict[name] = reference.clone()
            continue
        state_dict[name] = random_parameter(name, reference.shape, generator).to(dtype)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {".ckpt": folder / "random-sd.ckpt", ".safetensors": folder / "random-sd.safetensors"}
    torch.save({"state_dict": state_dict, "global_step": 0}, paths[".ckpt"])
    save_file(state_dict, str(paths[".safetensors"]))
    return paths


def max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)


def peak_memory(device: torch.device) -> tuple[int, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "max_memory_allocated"
    return max_rss_bytes(), "max RSS"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- loading ---------------------------------------------------------------------------------------------------------
def load_worker(kind: str, path: str, config: str, device: str, dtype_name: str, threads: int | None) -> dict:
    """One load in this (fresh) process: time, time until every weight has been read, peak RSS."""
    if threads:
        torch.set_num_threads(threads)
    from omegaconf import OmegaConf

    from ldm.loading import load_model
    from ldm.util import instantiate_from_config
    device, dtype = torch.device(device), PRECISIONS[dtype_name]
    config_yaml = OmegaConf.load(config)
    baseline = max_rss_bytes()
    timings: dict[str, float] = {}
    start = time.perf_counter()
    if kind == "compvis":
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file
            state_dict = load_file(path)
        else:
            state_dict = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
        model = instantiate_from_config(config_yaml.model)
        model.load_state_dict(state_dict, strict=False)
        del state_dict
        model = model.to(device, dtype).eval()
    else:
        model = load_model(path, config_yaml, device=device, dtype=dtype, timings=timings)
    synchronize(device)
    loaded = time.perf_counter()
    peak = max_rss_bytes()
    with torch.no_grad():  # read one element per 4 KiB page of every weight: forces memory-mapped pages in
        for tensor in model.state_dict().values():
            flat = tensor.reshape(-1)
            flat[::max(1, 4096 // flat.element_size())].float().sum().item()
    return dict(kind=kind, load_s=loaded - start, touched_s=time.perf_counter() - start, timings=timings,
                peak_rss=peak, peak_rss_after_touch=max_rss_bytes(), baseline_rss=baseline)


def call_in_fresh_process(function, *args) -> dict:
    with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
        return pool.apply(function, args)


def run_load_benchmark(args: argparse.Namespace, files: dict[str, Path]) -> list[dict]:
    results = []
    for suffix, path in files.items():
        size = path.stat().st_size
        for repeat in range(args.load_runs):
            for kind in ("compvis", "ours"):
                result = call_in_fresh_process(load_worker, kind, str(path), args.config, args.device,
                                                args.precision, args.threads)
                result.update(format=suffix, file_bytes=size, repeat=repeat)
                print(f"  load {suffix:12s} {kind:8s} {result['load_s']:7.2f} s (all weights read after "
                      f"{result['touched_s']:6.2f} s), peak RSS {result['peak_rss'] / 2**30:5.2f} GiB", flush=True)
                results.append(result)
    return results


# --- pipelines -------------------------------------------------------------------------------------------------------
class OurPipeline:
    """Prompt -> image with this project's `ldm.pipeline.Pipeline` (what the scripts run): one DDIM request with the
    benchmark's seed, whose starting noise is the `x_T` every pipeline gets."""

    def __init__(self, ckpt: str, config: str, device: torch.device, dtype: torch.dtype, variant: str, seed: int):
        from ldm.pipeline import Pipeline

        options = dict(hash_files=False, fast_paths=variant != "plain", compile=variant == "compile",
                       cuda_graphs=variant == "cuda graphs", **MEMORY_MODES.get(variant, {}))
        precision = {torch.float32: "full", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]
        self.pipeline = Pipeline.from_checkpoint(ckpt, config, str(device), precision, **options)
        self.seed = seed
        self.applied = list(self.pipeline.applied)
        if variant == "compile":  # compile_model swaps the oneDNN layers back: inductor packs weights itself
            self.applied = [name for name in self.applied if name != "oneDNN kernels"] + ["torch.compile"]
        elif variant != "plain" and variant != "fast":
            self.applied.append(variant)

    def __call__(self, prompt: str, x_T: torch.Tensor, steps: int, scale: float) -> tuple[torch.Tensor, float]:
        from ldm.pipeline import Request

        size = x_T.shape[-1] * 8  # x_T is the noise the request's seed draws (one CPU generator per image)
        result = self.pipeline(Request(prompt, seed=self.seed, steps=steps, sampler="ddim", scale=scale, height=size,
                                       width=size))
        images = torch.from_numpy(result.pixels).permute(0, 3, 1, 2).float() / 255.0
        return images, result.sampling_seconds


# each memory mode as pipeline options (256-pixel VAE tiles, so that 512x512 images are tiled)
MEMORY_MODES = {"attention slicing": {"attention_slicing": True}, "vae tiling": {"vae_tiling": True, "vae_tile": 32},
                "vae slicing": {"vae_slicing": True}, "model offload": {"offload": "model"},
                "sequential offload": {"offload": "sequential"}}


class DiffusersPipeline:
    """diffusers' StableDiffusionPipeline (default SDPA attention) built offline from the same checkpoint; it starts
    from the given x_T (`seed` is the one x_T was drawn with)."""

    def __init__(self, ckpt: str, config: str, device: torch.device, dtype: torch.dtype, variant: str, seed: int):
        import transformers

        from ldm.modules.encoders.clip_tokenizer import write_hf_vocabulary
        from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
        from diffusers.loaders import single_file_utils as convert
        from omegaconf import OmegaConf

        from ldm.checkpoints import read_checkpoint
        original = OmegaConf.to_container(OmegaConf.load(config), resolve=True)
        params = original["model"]["params"]
        if "FrozenCLIPEmbedder" not in params["cond_stage_config"]["target"]:
            raise SystemExit("the diffusers comparison supports SD 1.x configs (CLIP ViT-L text encoder)")
        checkpoint, _ = read_checkpoint(ckpt)
        unet_config = convert.create_unet_diffusers_config_from_ldm(original, checkpoint)
        vae_config = convert.create_vae_diffusers_config_from_ldm(original, checkpoint)
        with torch.device("meta"):  # the large models are built without random init, as ours are
            unet, vae = UNet2DConditionModel(**unet_config), AutoencoderKL(**vae_config)
        unet.load_state_dict(convert.convert_ldm_unet_checkpoint(checkpoint, unet_config), assign=True)
        vae.load_state_dict(convert.convert_ldm_vae_checkpoint(checkpoint, vae_config), assign=True)
        text_params = params["cond_stage_config"].get("params", {})
        width, layers, heads = (text_params.get(k, d) for k, d in (("width", 768), ("layers", 12), ("heads", 12)))
        text_config = transformers.CLIPTextConfig(
            vocab_size=49408, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
            num_attention_heads=heads, max_position_embeddings=77, hidden_act="quick_gelu", layer_norm_eps=1e-5)
        text_encoder = transformers.CLIPTextModel(text_config)
        text_weights = convert.convert_ldm_clip_checkpoint(checkpoint)
        if not hasattr(text_encoder, "text_model"):
            text_weights = {k.removeprefix("text_model."): v for k, v in text_weights.items()}
        expected = text_encoder.state_dict()
        text_encoder.load_state_dict({k: v for k, v in text_weights.items() if k in expected}, strict=True)
        for model in (unet, vae, text_encoder):
            meta = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
            if meta:
                raise SystemExit(f"diffusers model left unloaded tensors: {meta[:3]}")
        folder = Path(tempfile.mkdtemp())
        write_hf_vocabulary(folder)
        tokenizer = transformers.CLIPTokenizer.from_pretrained(str(folder), pad_token="<|endoftext|>",
                                                               model_max_length=77, local_files_only=True)
        shutil.rmtree(folder)
        scheduler = DDIMScheduler(beta_start=params["linear_start"], beta_end=params["linear_end"],
                                  beta_schedule="scaled_linear", num_train_timesteps=params["timesteps"],
                                  clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                  timestep_spacing="leading")
        self.pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                            scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                            requires_safety_checker=False).to(device, dtype)
        self.pipe.set_progress_bar_config(disable=True)
        self.applied = ["diffusers defaults (SDPA attention)"]

    @torch.no_grad()
    def __call__(self, prompt: str, x_T: torch.Tensor, steps: int, scale: float) -> tuple[torch.Tensor, float]:
        start = time.perf_counter()
        size = x_T.shape[-1] * 8
        latents = self.pipe(prompt, height=size, width=size, num_inference_steps=steps, guidance_scale=scale,
                            eta=0.0, latents=x_T.to(self.pipe.unet.dtype), output_type="latent").images
        synchronize(x_T.device)
        denoised = time.perf_counter()
        vae = self.pipe.vae
        images = vae.decode(latents / vae.config.scaling_factor).sample
        return ((images.float() + 1) / 2).clamp(0, 1).cpu(), denoised - start


PIPELINES = {"diffusers": DiffusersPipeline}


def sampling_worker(connection, name: str, variant: str, options: dict) -> None:
    """Serve runs for one pipeline over `connection`: load once, then answer "run" with timings and the image."""
    if options["threads"]:
        torch.set_num_threads(options["threads"])
    device, dtype = torch.device(options["device"]), PRECISIONS[options["precision"]]
    start = time.perf_counter()
    pipeline = PIPELINES.get(name, OurPipeline)(options["ckpt"], options["config"], device, dtype, variant,
                                                options["seed"])
    synchronize(device)
    connection.send(dict(load_s=time.perf_counter() - start, applied=pipeline.applied))
    generator = torch.Generator().manual_seed(options["seed"])
    latent = options["size"] // 8
    x_T = torch.randn(1, 4, latent, latent, generator=generator).to(device)
    while (message := connection.recv()) != "stop":
        if message == "reset":  # measured runs start: the peak counts from here (on accelerators)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            connection.send(None)
            continue
        synchronize(device)
        start = time.perf_counter()
        images, denoise_s = pipeline(options["prompt"], x_T, options["steps"], options["scale"])
        synchronize(device)
        total = time.perf_counter() - start
        peak, what = peak_memory(device)
        connection.send(dict(total_s=total, denoise_s=denoise_s, peak=peak, peak_kind=what,
                             image=images.half().numpy()))


def run_sampling_benchmark(args: argparse.Namespace, ckpt: str) -> dict:
    variants = [("ours", "fast")]
    if args.plain:
        variants.append(("ours", "plain"))
    if not args.skip_diffusers:
        variants.append(("diffusers", "default"))
    if args.compile:
        variants.append(("ours", "compile"))
    if args.cuda_graphs:
        variants.append(("ours", "cuda graphs"))
    if args.memory_modes:
        variants += [("ours", mode) for mode in MEMORY_MODES]
    options = dict(ckpt=ckpt, config=args.config, device=args.device, precision=args.precision, size=args.size,
                   steps=args.steps, scale=args.scale, prompt=args.prompt, seed=args.seed, threads=args.threads)
    context = multiprocessing.get_context("spawn")
    workers = {}
    for name, variant in variants:
        parent, child = context.Pipe()
        process = context.Process(target=sampling_worker, args=(child, name, variant, options), daemon=True)
        process.start()
        workers[f"{name} ({variant})"] = (parent, process)
        info = parent.recv()
        print(f"  {name} ({variant}) ready in {info['load_s']:.1f} s: {', '.join(info['applied']) or 'plain'}",
              flush=True)
    results = {label: dict(runs=[], warmup=[]) for label in workers}
    try:
        for phase, count in (("warmup", args.warmup), ("runs", args.runs)):
            for _ in range(count):
                for label, (connection, _) in workers.items():
                    if phase == "runs" and not results[label]["runs"]:
                        connection.send("reset")
                        connection.recv()
                    connection.send("run")
                    result = connection.recv()
                    results[label][phase].append(result)
                    print(f"  {phase:6s} {label:28s} {result['total_s']:7.2f} s/image, "
                          f"{args.steps / result['denoise_s']:6.2f} it/s", flush=True)
    except EOFError:
        raise SystemExit("a benchmark worker died; its traceback is above") from None
    finally:
        for connection, process in workers.values():
            if process.is_alive():
                connection.send("stop")
            process.join(timeout=60)
    return results


# --- model architectures --------------------------------------------------------------------------------------------
# --compare-models names: configs under configs/stable-diffusion
MODELS = {"sdxl": "sd_xl_base.yaml", "ssd-1b": "ssd-1b.yaml", "vega": "segmind-vega.yaml",
          "sd-1.5": "v1-inference.yaml", "sd-2": "v2-inference-v.yaml"}


def model_config_path(name: str) -> Path:
    """The yaml config of a --compare-models entry: a name in MODELS or the path of a config."""
    return DEFAULT_CONFIG.parent / MODELS[name] if name in MODELS else Path(name)


def unet_config(config_path: str | Path):
    """The UNet's part of a model config: `network_config` (sgm, SDXL layout) or `unet_config` (CompVis)."""
    from ldm.loading import load_config

    params = load_config(config_path).model.params
    return params.get("network_config") or params["unet_config"]


def random_unet(config, seed: int, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The UNet of `config` (a `unet_config`) with seeded `random_parameter` weights, made one parameter at a time on
    `device` in `dtype`: no full-size float32 copy on the host, no random initialisation to throw away."""
    from ldm.loading import instantiate_on_meta

    unet = instantiate_on_meta(config)
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in [*unet.named_parameters()]:
        owner, _, attribute = name.rpartition(".")
        value = random_parameter(name, parameter.shape, generator).to(device, dtype)
        setattr(unet.get_submodule(owner), attribute, torch.nn.Parameter(value, requires_grad=False))
    return unet.to(device).eval()  # computed buffers (none in the UNets shipped here) follow


def unet_inputs(config, latent: int, device: torch.device, generator: torch.Generator,
                batch: int = 2) -> dict[str, torch.Tensor | None]:
    """Random UNet inputs for a guided step (unconditional and conditional halves): latents, timesteps, text context
    of the config's width and, for SDXL-layout UNets, the vector input (pooled text and size embeddings)."""
    params = config.params
    context_dim = params.context_dim if isinstance(params.context_dim, int) else params.context_dim[0]
    classes = params.get("num_classes")
    x = torch.randn(batch, params.in_channels, latent, latent, generator=generator)
    context = torch.randn(batch, 77, context_dim, generator=generator)
    if classes == "sequential":
        y = torch.randn(batch, params.adm_in_channels, generator=generator)
    else:
        y = torch.randint(classes, (batch,), generator=generator) if classes else None
    return {"x": x.to(device), "timesteps": torch.full((batch,), 500, device=device), "context": context.to(device),
            "y": None if y is None else y.to(device)}


def unet_flops(config, latent: int) -> int:
    """Floating-point operations of one UNet evaluation (a guided batch of 2), counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode

    from ldm.loading import instantiate_on_meta

    unet = instantiate_on_meta(config)
    inputs = unet_inputs(config, latent, torch.device("meta"), torch.Generator())
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(**inputs)
    return counter.get_total_flops()


def unet_worker(config_path: str, options: dict) -> dict:
    """Time UNet evaluations of one architecture with random weights in this (fresh) process."""
    from ldm import optimize

    if options["threads"]:
        torch.set_num_threads(options["threads"])
    device, dtype = torch.device(options["device"]), PRECISIONS[options["precision"]]
    config, latent = unet_config(config_path), options["size"] // 8
    flops = unet_flops(config, latent)
    start = time.perf_counter()
    unet = random_unet(config, options["seed"], device, dtype)
    weights = sum(t.numel() * t.element_size() for t in [*unet.parameters(), *unet.buffers()])
    parameters = sum(parameter.numel() for parameter in unet.parameters())
    applied = optimize.apply_fast_paths(unet, device)
    synchronize(device)
    built = time.perf_counter() - start
    inputs = unet_inputs(config, latent, device, torch.Generator().manual_seed(options["seed"]))
    timings: dict[str, list[float]] = {"warmup": [], "runs": []}
    with torch.no_grad():
        for phase in ("warmup", "runs"):
            if phase == "runs" and device.type == "cuda":  # the peak of the measured evaluations alone
                torch.cuda.reset_peak_memory_stats(device)
            for _ in range(options[phase]):
                synchronize(device)
                start = time.perf_counter()
                output = unet(**inputs)
                synchronize(device)
                timings[phase].append(time.perf_counter() - start)
    peak, what = peak_memory(device)
    return dict(parameters=parameters, weight_bytes=weights, flops=flops, build_s=built, applied=applied,
                output_std=output.float().std().item(), peak=peak, peak_kind=what, **timings)


def run_model_comparison(args: argparse.Namespace) -> dict:
    """Each architecture in its own fresh process, one after the other (one full-size UNet in memory at a time)."""
    options = {"device": args.device, "precision": args.precision, "size": args.size, "seed": args.seed,
               "threads": args.threads, "warmup": args.warmup, "runs": args.runs}
    results = {}
    for name in args.compare_models:
        result = call_in_fresh_process(unet_worker, str(model_config_path(name)), options)
        print(f"  {name}: built in {result['build_s']:.1f} s ({', '.join(result['applied']) or 'plain'}); runs "
              + " / ".join(f"{s:.2f}" for s in result["runs"]) + " s", flush=True)
        results[name] = result
    return results


def summarize_models(results: dict, size: int) -> dict:
    summary = {}
    first = next(iter(results))
    for name, result in results.items():
        step = statistics.median(result["runs"])
        summary[name] = {"s_per_step": step, "parameters": result["parameters"],
                         "weight_gib": result["weight_bytes"] / 2**30, "gflop_per_step": result["flops"] / 1e9,
                         "achieved_gflop_s": result["flops"] / 1e9 / step, "peak_gib": result["peak"] / 2**30,
                         "peak_kind": result["peak_kind"], "output_std": result["output_std"], "runs": result["runs"],
                         "warmup": result["warmup"], "applied": result["applied"]}
    reference = summary[first]
    print(f"UNet evaluations, guided batch of 2 at {size}x{size} ({size // 8}x{size // 8} latents), median of "
          f"{len(reference['runs'])}:")
    width = max(map(len, summary))
    for name, row in summary.items():
        row.update(speedup_vs_first=reference["s_per_step"] / row["s_per_step"],
                   parameters_vs_first=row["parameters"] / reference["parameters"],
                   flops_vs_first=row["gflop_per_step"] / reference["gflop_per_step"])
        print(f"{name:{width}s} {row['s_per_step']:8.3f} s/step  {row['parameters'] / 1e9:5.3f} B parameters  "
              f"{row['weight_gib']:6.2f} GiB weights  {row['gflop_per_step']:8.1f} GFLOP/step "
              f"({row['achieved_gflop_s']:6.1f} GFLOP/s)  peak {row['peak_gib']:6.2f} GiB ({row['peak_kind']})  "
              f"{row['speedup_vs_first']:.2f}x the speed of {first} with {row['parameters_vs_first']:.2f}x its "
              f"parameters and {row['flops_vs_first']:.2f}x its FLOPs")
    return summary


# --- report ----------------------------------------------------------------------------------------------------------
def machine() -> dict:
    model_name = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model_name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return dict(cpu=model_name, cpus=os.cpu_count(), threads=torch.get_num_threads(), torch=torch.__version__,
                python=platform.python_version(), gpu=gpu, platform=platform.platform())


def summarize_loads(results: list[dict]) -> dict:
    summary = {}
    for suffix in dict.fromkeys(r["format"] for r in results):
        rows = [r for r in results if r["format"] == suffix]
        median = {kind: {key: statistics.median(r[key] for r in rows if r["kind"] == kind)
                         for key in ("load_s", "touched_s", "peak_rss", "peak_rss_after_touch")}
                  for kind in ("compvis", "ours")}
        size = rows[0]["file_bytes"]
        summary[suffix] = dict(file_gib=size / 2**30, **{f"{kind}_{key}": value for kind in median
                                                          for key, value in median[kind].items()},
                               speedup=median["compvis"]["load_s"] / median["ours"]["load_s"],
                               speedup_with_reads=median["compvis"]["touched_s"] / median["ours"]["touched_s"],
                               ours_rss_over_file=median["ours"]["peak_rss"] / size,
                               ours_rss_over_file_after_reads=median["ours"]["peak_rss_after_touch"] / size)
        print(f"load {suffix}: CompVis-style {median['compvis']['load_s']:.2f} s, ours {median['ours']['load_s']:.2f}"
              f" s ({summary[suffix]['speedup']:.1f}x; {summary[suffix]['speedup_with_reads']:.1f}x counting the "
              f"reads of every weight); our peak RSS {summary[suffix]['ours_rss_over_file']:.2f}x the file "
              f"({summary[suffix]['ours_rss_over_file_after_reads']:.2f}x after every weight was read)")
    return summary


def summarize_sampling(results: dict, steps: int) -> dict:
    summary = {}
    reference = None
    for label, result in results.items():
        runs = result["runs"]
        total = statistics.median(r["total_s"] for r in runs)
        denoise = statistics.median(r["denoise_s"] for r in runs)
        summary[label] = dict(s_per_image=total, it_per_s=steps / denoise,
                              peak_gib=max(r["peak"] for r in runs) / 2**30, peak_kind=runs[0]["peak_kind"],
                              runs=[r["total_s"] for r in runs], warmup=[r["total_s"] for r in result["warmup"]])
        if reference is None:
            reference = runs[-1]["image"].astype("float32")
        else:
            summary[label]["max_pixel_difference_from_first"] = float(abs(runs[-1]["image"].astype("float32")
                                                                          - reference).max())
    first = next(iter(summary))
    for label, row in summary.items():
        row["speedup_of_first"] = row["s_per_image"] / summary[first]["s_per_image"]
        difference = row.get("max_pixel_difference_from_first")
        print(f"{label:28s} {row['s_per_image']:7.2f} s/image {row['it_per_s']:6.2f} it/s  peak {row['peak_gib']:5.2f}"
              f" GiB ({row['peak_kind']})  {first} is {row['speedup_of_first']:.2f}x faster"
              + (f"  max pixel difference {difference:.4f}" if difference is not None else ""))
    return summary


def run_pipeline_benchmarks(args: argparse.Namespace, report: dict) -> None:
    """The load and sampling benchmarks, on --ckpt or a random checkpoint written for them."""
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="sd-benchmark-"))
    try:
        if args.ckpt:
            files = {Path(args.ckpt).suffix or ".ckpt": Path(args.ckpt)}
        elif args.workdir and all((workdir / f"random-sd{suffix}").is_file() for suffix in (".ckpt", ".safetensors")):
            files = {suffix: workdir / f"random-sd{suffix}" for suffix in (".ckpt", ".safetensors")}
            print(f"reusing the random checkpoints in {workdir}")
        else:
            dtype = torch.float16 if args.precision == "fp16" else torch.float32
            start = time.perf_counter()
            files = write_random_checkpoint(args.config, workdir, dtype, args.seed)
            print(f"wrote random {str(dtype).replace('torch.', '')} checkpoints in {time.perf_counter() - start:.0f} s"
                  f": {', '.join(f'{p} ({p.stat().st_size / 2**30:.2f} GiB)' for p in files.values())}", flush=True)
        if not args.skip_load:
            report["load"] = summarize_loads(run_load_benchmark(args, files))
        if not args.skip_sampling:
            ckpt = str(files.get(".safetensors", next(iter(files.values()))))
            report["sampling"] = summarize_sampling(run_sampling_benchmark(args, ckpt), args.steps)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    report = dict(machine=machine(), options=vars(args))
    print(json.dumps(report["machine"]))
    if args.compare_models:
        report["models"] = summarize_models(run_model_comparison(args), args.size)
    else:
        run_pipeline_benchmarks(args, report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
