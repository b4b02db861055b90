"""`scripts/upscale.py`: Stability's SD 2 x4 upscaler (x4-upscaler-ema.ckpt) on the txt2img run machinery.

The init image is read as RGB at its own size (never resized) and scaled to [-1, 1]; each image of a batch noises it
to --noise_level with its own seed and samples latents of the same height and width beside it, which the f=4
autoencoder decodes to 4x the size (`ldm.models.diffusion.upscale.sample_upscale`). Everything else (plan, seeds,
saving, metadata, summary, memory flags) is txt2img's `Run`.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from ldm.cli import arguments
from ldm.cli.arguments import UsageError, nearest_multiples, refuse_flags
from ldm.cli.img2img import (TXT2IMG_ONLY, hash_init_image, image_to_tensor, load_init_image, read_recorded,
                              take_recorded_file)
from ldm.cli.metadata import ImageRecord
from ldm.cli.plan import PlannedImage, RunPlan, is_upscaler_config, model_geometry
from ldm.cli.txt2img import Run
from ldm.cli.txt2img import main as run_main
from ldm.models.diffusion.noise import ImageNoise

PROG = "upscale.py"
RELEASED_GEOMETRY = (4, 8)  # x4-upscaling.yaml: autoencoder factor (the upscaling factor), UNet downsampling
RELEASED_MAX_NOISE_LEVEL = 350
DESCRIPTION = ("Upscale an image 4x with Stability's SD 2 x4 upscaler (x4-upscaler-ema.ckpt), guided by a prompt "
               "that describes it.")
EPILOG = """\
init image: read as RGB at its own size, which must be a multiple of 8 pixels per side (the output, 4x larger,
passes through the UNet's 8x downsampling at the latents' size). --noise_level (0 to 350) noises it before the
model sees it, as Stability's script and diffusers do: more noise lets the model invent more detail and fix more
of the input's artefacts, less keeps closer to it. Each image's augmentation noise and starting noise come from its
own seed. Large outputs: --vae_tiling decodes in tiles (the autoencoder runs at the full output size), and
--attention_slicing / --offload help the UNet.

""" + arguments.EPILOG
# flags that make no sense here: hidden from --help and refused when given
NOT_FOR_UPSCALING = {**TXT2IMG_ONLY,
                     "controlnet": "adds a ControlNet to a text-to-image model",
                     "control_image": "is the image a --controlnet follows",
                     "H": "sets the output height, which is 4x the init image's",
                     "W": "sets the output width, which is 4x the init image's"}


def build_parser() -> argparse.ArgumentParser:
    """txt2img's parser with upscaling defaults (diffusers' guidance scale 9), --init-img and --noise_level."""
    parser = arguments.build_parser()
    parser.prog, parser.description, parser.epilog = PROG, DESCRIPTION, EPILOG
    parser.set_defaults(outdir="outputs/upscale-samples", n_iter=1, n_samples=1, scale=9.0, prompt="")
    for action in parser._actions:  # argparse has no public way to edit an added flag
        if action.dest in NOT_FOR_UPSCALING or action.dest == "control_scale":
            action.help = argparse.SUPPRESS
        elif action.dest == "prompt":
            action.help = "what the image shows (helps the model invent matching detail)"
    parser.add_argument("--init-img", type=str, nargs="?", default=None,
                        help="path to the low-resolution image to upscale (sides multiples of 8)")
    parser.add_argument("--noise_level", type=int, default=20,
                        help="noise added to the init image before upscaling, 0 to 350: more lets the model change "
                             "more")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def not_an_upscaler(ckpt: str) -> str:
    return (f"{ckpt} is not the x4 upscaler (x4-upscaler-ema.ckpt, with configs/stable-diffusion/x4-upscaling.yaml): "
            f"to redraw an image with a text-to-image model use scripts/img2img.py")


@dataclass
class UpscaleRecord(ImageRecord):
    """An upscaled image's settings: txt2img's plus the noise level and which image it was made from."""

    noise_level: int = 20
    init_image: str = ""  # the --init-img path as given
    init_image_hash: str = ""  # first 10 hex digits of its SHA-256

    def extra_parameters(self) -> list[tuple[str, str]]:
        pairs = [("Noise level", str(self.noise_level)), ("Init image", Path(self.init_image).name)]
        return pairs + ([("Init image hash", self.init_image_hash)] if self.init_image_hash else [])


class UpscaleRun(Run):
    """txt2img's run, sampling every batch beside the noise-augmented init image at 4x its size."""

    prog = PROG
    record_type = UpscaleRecord

    def __init__(self, opt: argparse.Namespace):
        refuse_flags(opt, NOT_FOR_UPSCALING, "upscale.py")
        recorded = read_recorded(opt, PROG)
        if recorded is not None:
            opt.noise_level = int(recorded["noise_level"])
            take_recorded_file(opt, recorded, "init_img", "init_image", "the init image", "--init-img")
        config = self.peek_config(opt)
        if config is not None and not is_upscaler_config(config):  # before the size rules of another model
            raise UsageError(not_an_upscaler(opt.ckpt))
        max_level = self.max_noise_level(config)
        if not 0 <= opt.noise_level <= max_level:
            raise UsageError(f"--noise_level {opt.noise_level} is outside [0, {max_level}]: 0 keeps the init image "
                             f"as it is, {max_level} noises it most (Stability's and diffusers' default is 20)")
        self.init_image = load_init_image(opt.init_img, purpose="the low-resolution image to upscale")
        factor, unet_factor = self.geometry(config)
        width, height = self.init_image.size
        if width % unet_factor or height % unet_factor:
            raise UsageError(f"--init-img is {width}x{height}: this model takes sides that are multiples of "
                             f"{unet_factor} (the {factor}x output passes the UNet's {unet_factor}x downsampling); "
                             f"crop or pad it to a width of {nearest_multiples(width, unet_factor)} and a height of "
                             f"{nearest_multiples(height, unet_factor)}")
        opt.W, opt.H = factor * width, factor * height
        super().__init__(opt)
        self.init_image_hash = hash_init_image(self, (recorded or {}).get("init_image_hash"))
        self.low_res: torch.Tensor | None = None  # the init image in [-1, 1], made once

    @staticmethod
    def geometry(config: Any) -> tuple[int, int]:
        """(upscaling factor = the autoencoder's, UNet downsampling) of the model; the released one's until the
        config can be read (its problems are reported later)."""
        try:
            factor, _, unet_factor = model_geometry(config)
        except (AttributeError, KeyError, TypeError):
            return RELEASED_GEOMETRY
        return factor, unet_factor

    @staticmethod
    def max_noise_level(config: Any) -> int:
        try:
            return int(config.model.params.low_scale_config.params.max_noise_level)
        except (AttributeError, KeyError, TypeError, ValueError):
            return RELEASED_MAX_NOISE_LEVEL

    def check_model_kind(self, config: Any) -> None:
        if not is_upscaler_config(config):
            raise UsageError(not_an_upscaler(self.opt.ckpt))

    def make_plan(self, opt: argparse.Namespace) -> RunPlan:
        plan = super().make_plan(opt)
        for image in plan.images:  # a prompt-file line or a sidecar can carry its own size
            if (image.settings["W"], image.settings["H"]) != (opt.W, opt.H):
                raise UsageError(f"a size of {image.settings['W']}x{image.settings['H']} is asked for, but the "
                                 f"output is 4x the init image, {opt.W}x{opt.H}: drop W and H from the prompt file "
                                 f"(or pass the init image the metadata was made from)")
        return plan

    def sample_latents(self, batch: list[PlannedImage], cond: Any, uncond: Any, sampler: str, steps: int,
                       eta: float | None) -> tuple[torch.Tensor, int]:
        from ldm.models.diffusion.upscale import sample_upscale

        if self.low_res is None:
            self.low_res = image_to_tensor(self.init_image, *self.init_image.size)  # its own size: no resampling
        latents = sample_upscale(self.model, sampler, steps, self.low_res, self.opt.noise_level, cond, uncond,
                                 batch[0].settings["scale"], ImageNoise([image.seed for image in batch]), eta=eta)
        return latents, steps

    def record(self, image: PlannedImage) -> UpscaleRecord:
        return UpscaleRecord(**super().record(image).to_mapping(), noise_level=self.opt.noise_level,
                             init_image=self.opt.init_img, init_image_hash=self.init_image_hash)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the x4 upscaler with command-line `argv`; returns the exit status (0 done, 1 failed, 2 bad input)."""
    return run_main(argv, prog=PROG, parse=parse_args, run_type=UpscaleRun)
