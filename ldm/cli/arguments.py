"""The txt2img command line: every flag of the CompVis script (same names, types, defaults) and this tool's own."""
from __future__ import annotations

import argparse
import math
import os
import re
import sys
import textwrap
from typing import Sequence

from ldm.models.diffusion.samplers import available_samplers
from ldm.pipeline.errors import UsageError
from ldm.pipeline.request import resolve_sampler

DEFAULT_CKPT = "models/ldm/stable-diffusion-v1/model.ckpt"
PRECISIONS = ("full", "autocast", "fp32", "fp16", "bf16")

DESCRIPTION = "Text to image with Stable Diffusion (the CompVis txt2img script, with the same flags)."
EPILOG = """\
seeds: image i of a run, counting across --n_iter and prompts in the order they are made, gets seed + i, and its
noise comes from a CPU generator of its own, so an image is the same whatever the batch size or device. With
--fixed_code the i-th image of every batch gets seed + i (the same starting code in every batch, as in CompVis). A
prompt-file line with its own "seed" gives that prompt's images seed, seed + 1, ... Seeds lie in 0..4294967295.

outputs: OUTDIR/samples/NNNNN.png (+ NNNNN.yaml sidecar) and OUTDIR/grid-NNNN.png, numbered after the highest
number present; files are never overwritten. Each PNG carries its settings in a "parameters" text chunk.

prompt files (--from-file): as in CompVis, each prompt is rendered once per iteration (--repeat times), in batches
of up to --n_samples. One prompt a line, UTF-8; blank lines and # comments are skipped; a line may be a JSON
object such as {"prompt": "a cat", "seed": 7, "scale": 5, "steps": 30, "H": 512, "W": 768, "sampler": "euler_a",
"negative_prompt": "blurry"}. A .yaml sidecar of a saved image is accepted too.

exit status: 0 done, 1 failed while generating, 2 bad input (nothing is written then)."""


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The epilog as written, and every flag's default after its help (unless the help already says it)."""

    def __init__(self, prog: str):
        super().__init__(prog, max_help_position=32)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "(default" in text or action.default is argparse.SUPPRESS:
            return text
        if isinstance(action, argparse._StoreTrueAction):
            return text + " (default: off)"
        shown = {None: "none", "": "empty"}.get(action.default, "%(default)s")
        return f"{text} (default: {shown})"

    def _split_lines(self, text: str, width: int) -> list[str]:
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump; main() prints it and exits 2
        flag = re.fullmatch(r"argument (--\S+): expected one argument", message)
        if flag:  # argparse reads a value such as -1e30 or -inf as a flag
            message += f" (a value that starts with '-' is written {flag.group(1)}=VALUE)"
        raise UsageError(message)


def _sampler_help() -> str:
    names = [name for name in available_samplers() if not name.endswith("_karras")]
    return (f"sampler by name (default: ddim, or as --plms/--dpm_solver say): {', '.join(names)}; add _karras for "
            f"Karras sigmas (dpmpp_2m_karras); the names other tools print work too (\"Euler a\", "
            f"\"DPM++ 2M Karras\"). --ddim_eta applies to ddim; other ancestral/SDE samplers keep eta 1 unless "
            f"--ddim_eta is not 0")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="txt2img.py", description=DESCRIPTION, epilog=EPILOG,
                     formatter_class=_HelpFormatter)
    add = parser.add_argument
    # The CompVis flags, in the CompVis order.
    add("--prompt", type=str, nargs="?", default="a painting of a virus monster playing guitar",
        help="the prompt to render")
    add("--outdir", type=str, nargs="?", default="outputs/txt2img-samples", help="dir to write results to")
    add("--skip_grid", action="store_true", help="do not save a grid, only individual samples")
    add("--skip_save", action="store_true", help="do not save individual samples (for speed measurements)")
    add("--ddim_steps", type=int, default=50, help="number of sampling steps (for every sampler)")
    add("--plms", action="store_true", help="use PLMS sampling (same as --sampler plms)")
    add("--dpm_solver", action="store_true", help="use DPM-Solver sampling (same as --sampler dpm_solver)")
    add("--laion400m", action="store_true", help="use the LAION-400M latent diffusion model paths of CompVis")
    add("--fixed_code", action="store_true", help="use the same starting code for every batch (see seeds below)")
    add("--ddim_eta", type=float, default=0.0, help="ddim eta (0.0 is deterministic sampling)")
    add("--n_iter", type=int, default=2, help="sample this often")
    add("--H", type=int, default=None,
        help="image height, in pixel space (default: 512), or the model's own size when its config says another")
    add("--W", type=int, default=None,
        help="image width, in pixel space (default: 512), or the model's own size when its config says another")
    add("--C", type=int, default=None, help="latent channels (default: 4), or the model's own when its config says another")
    add("--f", type=int, default=None,
        help="downsampling factor of the autoencoder (default: 8), or the model's own when its config says another")
    add("--n_samples", type=int, default=3, help="how many samples to produce for each given prompt; batch size")
    add("--n_rows", type=int, default=0, help="images per grid row (0: n_samples, one batch a row)")
    add("--scale", type=float, default=7.5,
        help="unconditional guidance scale: eps = eps(x, uncond) + scale * (eps(x, cond) - eps(x, uncond))")
    add("--from-file", type=str, default=None, help="load prompts from this file (see prompt files below)")
    add("--config", type=str, default=None,
        help="path to the config which constructs the model (default: the released config that fits the "
             "checkpoint's weights)")
    add("--ckpt", type=str, default=DEFAULT_CKPT,
        help="path to the checkpoint (.ckpt or .safetensors) or a diffusers model folder")
    add("--seed", type=int, default=42, help="the seed of the run's first image (0..4294967295)")
    add("--precision", type=str, choices=PRECISIONS, default=None,
        help="evaluate at this precision: autocast/fp16 = half precision on GPUs (fp32 on the CPU), full = fp32 "
             "on the CPU autocast is fp32, without a note (default: autocast)")
    # Stability's SD 2.x script.
    add("--repeat", type=int, default=1, help="render each prompt this often per iteration")
    add("--device", type=str, default=None, help="cuda, cuda:N, mps or cpu (default: the best available: cuda, "
                                                 "then mps, then cpu)")
    add("--bf16", action="store_true", help="use bfloat16 weights (same as --precision bf16)")
    # This tool's own.
    add("--sampler", type=str, default=None, help=_sampler_help())
    add("--negative_prompt", type=str, default="", help="what the image should not show (the unconditional prompt)")
    add("--vae", type=str, default=None,
        help="a separate autoencoder whose weights replace the checkpoint's: a file (CompVis or diffusers names) or a "
             "diffusers VAE folder")
    add("--unet", type=str, default=None,
        help="a separate UNet whose weights replace the checkpoint's (SDXL-Lightning's and Hyper-SD's *_unet files): "
             "a file (CompVis or diffusers names) or a diffusers UNet folder")
    add("--ema", action="store_true", help="use the checkpoint's EMA weights (default: as the config says)")
    add("--v_prediction", action="store_true",
        help="an SD 2.x checkpoint predicts v (default: guessed from '768' in the file name); used without --config")
    add("--no_metadata", action="store_true", help="write neither the PNG parameters chunk nor the .yaml sidecars")
    add("--lora_dir", type=str, default="models/Lora",
        help="where the prompts' <lora:name:weight> tags find their files (name.safetensors, also in subfolders)")
    add("--trust_config", action="store_true",
        help="let the yaml config (--config, or the .yaml beside the checkpoint) build classes from outside this "
             "project and use ${...} interpolations: only for configs you trust (see docs/security.md)")
    add("--resume", action="store_true",
        help="run the same command again and make only the images its manifest.jsonl does not list as done (any "
             "number of processes, under torchrun too)")
    add("--watermark", action="store_true",
        help="add the CompVis invisible watermark; needs the invisible-watermark package (default: off)")
    add("--safety_checker", type=str, default=None, metavar="PATH",
        help="a local safety checker folder (diffusers format); flagged images are replaced by black ones "
             "(default: off, never downloaded)")
    # Speed and memory (ldm.optimize).
    add("--attention_slicing", action="store_true", help="compute attention in slices: less memory, a bit slower")
    add("--vae_tiling", action="store_true", help="decode the image in overlapping tiles: large images in bounded memory")
    add("--vae_slicing", action="store_true", help="decode a batch one image at a time")
    add("--offload", choices=("model", "sequential"), default=None,
        help="keep weights in CPU memory and move them to the GPU only while they run: each sub-model (model) or "
             "layer by layer (sequential, least memory, slowest) (default: off)")
    add("--compile", action="store_true",
        help="torch.compile the UNet and decoder; the compilation is a warm-up before the first batch, timed apart")
    add("--cuda_graphs", action="store_true",
        help="CUDA GPUs: capture the UNet once per batch shape and replay it (less launch overhead); the capture is "
             "a warm-up before the first batch, timed apart")
    add("--lora", type=str, action="append", default=None, metavar="FILE[:WEIGHT]",
        help="merge a LoRA (.safetensors; kohya's names, or diffusers' / PEFT's) into the model with WEIGHT "
             "(default 1.0); repeat for several")
    add("--embeddings", type=str, action="append", default=None, metavar="DIR_OR_FILE",
        help="textual-inversion embeddings (.pt, .bin, .safetensors; a folder: all of them): a prompt or negative "
             "prompt naming a file's stem as a word uses its vectors; repeat for several")
    add("--refiner", type=str, default=None, metavar="PATH",
        help="SDXL: an SDXL refiner checkpoint that denoises the end of the schedule the base starts (k-diffusion "
             "samplers; its config found as --ckpt's is)")
    add("--refiner_switch", type=float, default=None, metavar="F",
        help="with --refiner: the fraction of the sampling the base runs before the refiner takes over (default 0.8)")
    add("--controlnet", type=str, default=None, metavar="FILE",
        help="SD 1.x/2.x: a ControlNet file (control_v11p_sd15_canny.pth, ... any released layout) or diffusers "
             "ControlNet folder that steers every image with --control_image")
    add("--control_image", type=str, default=None, metavar="IMAGE",
        help="with --controlnet: the control image as the ControlNet expects it (an edge map, pose image, ...; no "
             "preprocessor runs), resized to --W x --H")
    add("--control_scale", type=float, default=None, metavar="F",
        help="with --controlnet: its strength, 0 to 2 (default 1.0)")
    add("--metadata_from", type=str, default=None, metavar="FILE",
        help="regenerate one image from its .yaml sidecar (or PNG): its prompt, seed, steps, sampler, scale, size")
    add("--prompt_weighting", action="store_true",
        help="read prompts and negative prompts as AUTOMATIC1111 does: (word), [word], (word:1.2) weights, BREAK, "
             "and prompts past 75 tokens in chunks of 75 (default: off, plain text as CompVis, cut at 75 tokens)")
    add("--scheduler", type=str, default=None,
        help="the schedule type for k-diffusion samplers: AUTOMATIC1111's Automatic, Uniform, Karras, Exponential, "
             "Polyexponential, SGM Uniform, KL Optimal, Align Your Steps, Simple, Normal, DDIM, Beta (its sigmas, "
             "defaults and dropped sigmas), or diffusers' timestep spacings Leading, Linspace, Trailing and LCM's "
             "(default: this tool's sampler schedules)")
    add("--clip_skip", type=int, default=1,
        help="AUTOMATIC1111's clip skip: 2 reads the text encoder's penultimate layer (SD 1.x; SD 2.x and SDXL "
             "ignore it, as there)")
    add("--clip_skip_sdxl", action="store_true",
        help="AUTOMATIC1111's \"Clip skip SDXL\" option: SDXL's CLIP ViT-L reads hidden layer -clip_skip too, without "
             "the final norm (with --clip_skip 1 its last layer, not SDXL's usual penultimate)")
    # AUTOMATIC1111's noise options, with its API's names.
    add("--rng", type=str, choices=("cpu", "gpu", "nv"), default="cpu",
        help="random source of the noise: cpu (torch's CPU generator: the same images on every machine), gpu (torch "
             "on the CUDA device, AUTOMATIC1111's default), nv (CUDA's generator emulated on any device)")
    add("--ensd", type=int, default=0,
        help="eta noise seed delta (AUTOMATIC1111's ENSD): the ancestral/SDE noise of each image comes from seed + ENSD")
    add("--subseed", type=int, default=None,
        help="variation seed: each image's starting noise is blended towards this seed's (image i: subseed + i)")
    add("--subseed_strength", type=float, default=0.0,
        help="how far towards the variation seed's noise, 0 to 1 (with it, every image keeps --seed)")
    add("--seed_resize_from_w", type=int, default=0,
        help="make the seeds' noise as for this width (with --seed_resize_from_h): keeps a seed's composition at "
             "another size")
    add("--seed_resize_from_h", type=int, default=0, help="the height for --seed_resize_from_w")
    # AUTOMATIC1111's hires fix, with its API's names: on when --hr_scale or --hr_resize_x/_y is given.
    add("--hr_scale", type=float, default=None,
        help="hires fix: make each image at --W x --H, upscale it this many times and refine it in a second pass")
    add("--hr_upscaler", type=str, default="Latent",
        help="hires fix upscaler: Latent, Latent (antialiased), Latent (bicubic), Latent (bicubic antialiased), "
             "Latent (nearest), Latent (nearest-exact), Lanczos or Nearest")
    add("--hr_second_pass_steps", type=int, default=0, help="hires fix: steps of the second pass (0: --ddim_steps)")
    add("--hr_resize_x", type=int, default=0, help="hires fix: the second pass's width instead of --hr_scale")
    add("--hr_resize_y", type=int, default=0, help="hires fix: the second pass's height instead of --hr_scale")
    add("--denoising_strength", type=float, default=0.7,
        help="hires fix: how much the second pass changes the upscaled image (0 to 1)")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return parse_with_given(build_parser(), argv)


def parse_with_given(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """`parser.parse_args(argv)`, with `given`: the destinations of the flags the command line names (they win over
    the settings of a --metadata_from image)."""
    opt = parser.parse_args(argv)
    words = {word.split("=", 1)[0] for word in (sys.argv[1:] if argv is None else argv) if str(word).startswith("-")}
    opt.given = {action.dest for action in parser._actions if words & set(action.option_strings)}
    return opt


def check_counts(opt: argparse.Namespace) -> None:
    """The run-wide numbers that must be positive (or zero)."""
    for flag, minimum in (("n_iter", 1), ("n_samples", 1), ("repeat", 1), ("n_rows", 0), ("C", 1), ("f", 1)):
        value = getattr(opt, flag)
        if value is not None and value < minimum:
            raise UsageError(f"--{flag} {value} is too small: it must be at least {minimum}")


def refuse_flags(opt: argparse.Namespace, refused: dict[str, str], prog: str) -> None:
    """UsageError for the first flag of `refused` (name -> why) that `opt` sets: a flag `prog` does not take."""
    for flag, reason in refused.items():
        if getattr(opt, flag):
            raise UsageError(f"--{flag} {reason}: {prog} does not take it")


def lora_specs(values: Sequence[str] | None) -> list[tuple[str, float]]:
    """`--lora FILE[:WEIGHT]` values as (file, weight); the file must exist. A colon belongs to the weight only when
    a number follows it, so Windows paths like C:\\loras\\x.safetensors still work."""
    specs = []
    for value in values or []:
        path, weight = value, 1.0
        head, colon, tail = value.rpartition(":")
        if colon and head:
            try:
                path, weight = head, float(tail)
            except ValueError:
                path = value
                if os.path.isfile(head) and not os.path.isfile(value):
                    raise UsageError(f"--lora {value}: the weight {tail} is not a number (use FILE:WEIGHT, e.g. "
                                     f"{head}:0.8)") from None
        if not math.isfinite(weight):
            raise UsageError(f"--lora {value}: the weight {tail} is not a finite number")
        if os.path.isdir(path):
            raise UsageError(f"--lora {value}: {path} is a folder: pass one LoRA file (repeat --lora for several)")
        if not os.path.isfile(path):
            raise UsageError(f"--lora {value}: {path} not found (use FILE or FILE:WEIGHT, e.g. style.safetensors:0.8)")
        specs.append((path, weight))
    return specs


def sampler_from_flags(opt: argparse.Namespace) -> str:
    """The sampler the flags ask for: --sampler, --plms or --dpm_solver (refusing contradictions), else ddim."""
    from_flags = [name for flag, name in (("plms", "plms"), ("dpm_solver", "dpm_solver")) if getattr(opt, flag)]
    if len(from_flags) > 1:
        raise UsageError("--plms and --dpm_solver exclude each other: pick one sampler")
    if opt.sampler is not None and from_flags and resolve_sampler(opt.sampler) != from_flags[0]:
        raise UsageError(f"--sampler {opt.sampler} contradicts --{from_flags[0]}: pick one sampler")
    return resolve_sampler(opt.sampler) if opt.sampler is not None else (from_flags or ["ddim"])[0]


