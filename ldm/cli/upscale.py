"""`scripts/upscale.py`: Stability's SD 2 x4 upscaler (x4-upscaler-ema.ckpt): txt2img's shell with the
`ldm.pipeline.Upscale` add-on.

The init image is read as RGB at its own size (never resized) and scaled to [-1, 1]; each image of a batch noises it
to --noise_level with its own seed and samples latents of the same height and width beside it, which the f=4
autoencoder decodes to 4x the size (`ldm.models.diffusion.upscale.sample_upscale`). Everything else (plan, seeds,
saving, metadata, summary, memory flags) is txt2img's.
"""
from __future__ import annotations

import argparse
from typing import Sequence

from ldm.cli import arguments
from ldm.cli.arguments import refuse_flags
from ldm.cli.img2img import TXT2IMG_ONLY, file_hash, read_recorded, take_recorded_file
from ldm.cli.plan import peek_config
from ldm.cli.txt2img import Shell
from ldm.cli.txt2img import main as run_main
from ldm.pipeline import AddOn, Upscale
from ldm.pipeline.addons.upscale import not_an_upscaler
from ldm.pipeline.errors import UsageError
from ldm.pipeline.images import load_image
from ldm.pipeline.model_info import is_upscaler_config

PROG = "upscale.py"
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
    return arguments.parse_with_given(build_parser(), argv)


class UpscaleShell(Shell):
    """txt2img's shell, sampling every batch beside the noise-augmented init image at 4x its size."""

    prog = PROG

    def prepare(self, opt: argparse.Namespace) -> None:
        refuse_flags(opt, NOT_FOR_UPSCALING, "upscale.py")
        recorded = read_recorded(opt, PROG)
        if recorded is not None:
            opt.noise_level = int(recorded["noise_level"])
            take_recorded_file(opt, recorded, "init_img", "init_image", "the init image", "--init-img")
        self.recorded_init_hash = (recorded or {}).get("init_image_hash")
        config = peek_config(opt)
        if config is not None and not is_upscaler_config(config):  # before the size rules of another model
            raise UsageError(not_an_upscaler(opt.ckpt))
        image = load_image(opt.init_img, purpose="the low-resolution image to upscale")
        self.upscale = Upscale(image, opt.noise_level, opt.init_img)
        self.upscale.check_noise_level(config)
        opt.W, opt.H = self.upscale.output_size(config)

    def sampling_addon(self) -> AddOn | None:
        self.upscale.image_hash = file_hash(self, self.opt.init_img, self.recorded_init_hash, "init image")
        return self.upscale


def main(argv: Sequence[str] | None = None) -> int:
    """Run the x4 upscaler with command-line `argv`; returns the exit status (0 done, 1 failed, 2 bad input)."""
    return run_main(argv, prog=PROG, parse=parse_args, shell=UpscaleShell)
