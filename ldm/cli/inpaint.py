"""`scripts/inpaint.py`: repaint the white part of a mask in an init image: img2img's shell with the
`ldm.pipeline.Inpaint` add-on.

Inpainting models (sd-v1-5-inpainting, 512-inpainting-ema) get the mask and the masked image's latents beside the
latents; every other SD 1.x/2.x/XL model repaints by latent blending (see `ldm.models.diffusion.inpainting`). The
init image is loaded, sized and encoded as img2img does it; the mask is resized to the same size (LANCZOS, as
diffusers resizes it), made grey and binarised at 0.5: white (>= 0.5) is repainted, black kept.
"""
from __future__ import annotations

import argparse
from typing import Sequence

from ldm.cli import arguments, img2img
from ldm.cli.img2img import Img2ImgShell, file_hash, read_recorded, take_recorded_file
from ldm.cli.txt2img import main as run_main
from ldm.pipeline import AddOn, Inpaint
from ldm.pipeline.images import load_image

PROG = "inpaint.py"
DESCRIPTION = ("Inpainting with Stable Diffusion: repaint the white part of --mask in --init-img, with an inpainting "
               "checkpoint (sd-v1-5-inpainting, 512-inpainting-ema) or any SD 1.x/2.x/XL checkpoint.")
EPILOG = """\
mask: white (>= 50% grey) is repainted, black kept, as in diffusers and Stability's inpainting script. It is
converted to grey levels and resized (LANCZOS) to the image's size (as diffusers does; a note says so when the
sizes differ), then binarised. The init image is sized as img2img sizes it (--W/--H, or its own size rounded down
to a multiple of 64).

models: inpainting checkpoints (9-channel UNets) see the mask and the masked image at every step; any sampler
works at --strength 1. Other checkpoints repaint by latent blending (diffusers' rule): after every step the kept
region is reset to the init image noised to that level; ddim and the k-diffusion samplers only.

--strength: 1 (the default) starts from pure noise; below 1 the init image is noised as img2img noises it and
int(strength * ddim_steps) steps run.

""" + img2img.EPILOG


def build_parser() -> argparse.ArgumentParser:
    """img2img's parser with inpainting defaults, --mask, and CompVis inpaint's --steps."""
    parser = img2img.build_parser()
    parser.prog, parser.description, parser.epilog = PROG, DESCRIPTION, EPILOG
    parser.set_defaults(outdir="outputs/inpainting-samples", strength=1.0)
    helps = {
        "plms": "use PLMS sampling (inpainting checkpoints at --strength 1 only)",
        "dpm_solver": "use DPM-Solver sampling (inpainting checkpoints at --strength 1 only)",
        "strength": "1 starts from pure noise; below 1 the init image is noised int(strength * ddim_steps) steps "
                    "deep and those steps run",
        "init_img": "path to the image to inpaint",
    }
    for action in parser._actions:  # argparse has no public way to edit an added flag
        if action.dest in helps:
            action.help = helps[action.dest]
    parser.add_argument("--mask", type=str, default=None,
                        help="path to the mask: white is repainted, black kept (resized to the image's size)")
    parser.add_argument("--steps", dest="ddim_steps", type=int, default=argparse.SUPPRESS,
                        help="number of sampling steps (CompVis inpaint's name for --ddim_steps)")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return arguments.parse_with_given(build_parser(), argv)


class InpaintShell(Img2ImgShell):
    """img2img's shell with a mask: the inpainting model sees it, or the kept region is blended back every step."""

    prog = PROG

    def prepare(self, opt: argparse.Namespace) -> None:
        record = read_recorded(opt, PROG)
        if record is not None:  # --metadata_from an inpainted image: its mask unless --mask names one
            take_recorded_file(opt, record, "mask", "mask", "the mask", "--mask")
        self.recorded_mask_hash = (record or {}).get("mask_hash")
        self.mask_image = load_image(opt.mask, "--mask", "the mask (white: repaint, black: keep)")
        super().prepare(opt)

    def sampling_addon(self) -> AddOn | None:
        opt = self.opt
        image_hash = file_hash(self, opt.init_img, self.recorded_init_hash, "init image")
        if self.mask_image.size != self.init_image.size:
            self.note(f"the mask is {self.mask_image.size[0]}x{self.mask_image.size[1]}, the init image "
                      f"{self.init_image.size[0]}x{self.init_image.size[1]}: both are resized to {opt.W}x{opt.H} "
                      f"(as diffusers does)")
        addon = Inpaint(self.init_image, self.mask_image, opt.strength, opt.init_img, image_hash, opt.mask,
                        steps_rule=opt.img2img_steps)
        if not addon.has_white:
            self.note(f"the mask {opt.mask} has no white (>= 50% grey): nothing will be repainted")
        addon.mask_hash = file_hash(self, opt.mask, self.recorded_mask_hash, "mask")
        self.addon = addon
        return addon


def main(argv: Sequence[str] | None = None) -> int:
    """Run inpainting with command-line `argv`; returns the exit status (0 done, 1 failed, 2 bad input)."""
    return run_main(argv, prog=PROG, parse=parse_args, shell=InpaintShell)
