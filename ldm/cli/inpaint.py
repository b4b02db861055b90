"""`scripts/inpaint.py`: repaint the white part of a mask in an init image, on the img2img run machinery.

Inpainting models (sd-v1-5-inpainting, 512-inpainting-ema) get the mask and the masked image's latents beside the
latents; every other SD 1.x/2.x/XL model repaints by latent blending (see `ldm.models.diffusion.inpainting`). The
init image is loaded, sized and encoded as img2img does it; the mask is resized to the same size (LANCZOS, as
diffusers resizes it), made grey and binarised at 0.5: white (>= 0.5) is repainted, black kept.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ldm.cli import img2img
from ldm.cli.arguments import UsageError
from ldm.cli.img2img import (Img2ImgRecord, Img2ImgRun, encode_init_image, image_to_tensor, load_init_image,
                              read_recorded, take_recorded_file)
from ldm.cli.plan import PlannedImage, RunPlan, is_inpainting_config
from ldm.cli.txt2img import Run
from ldm.cli.txt2img import main as run_main
from ldm.models.diffusion.noise import ImageNoise

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
    return build_parser().parse_args(argv)


def mask_to_tensor(mask: Any, width: int, height: int) -> torch.Tensor:
    """The mask (PIL) in grey levels, resized (LANCZOS) to width x height and binarised: [1, 1, H, W], 1 = repaint."""
    from PIL import Image

    from ldm.models.diffusion.inpainting import binarize_mask

    grey = mask.convert("L").resize((width, height), resample=Image.LANCZOS)
    return binarize_mask(torch.from_numpy(np.asarray(grey).astype(np.float32) / 255.0)[None, None])


@dataclass
class InpaintRecord(Img2ImgRecord):
    """An inpainted image's settings: img2img's plus which mask it was made with."""

    mask: str = ""  # the --mask path as given
    mask_hash: str = ""  # first 10 hex digits of its SHA-256

    def extra_parameters(self) -> list[tuple[str, str]]:
        pairs = [("Mask", Path(self.mask).name)] + ([("Mask hash", self.mask_hash)] if self.mask_hash else [])
        return super().extra_parameters() + pairs


def apply_recorded_mask(opt: argparse.Namespace) -> str | None:
    """--metadata_from an inpainted image: its mask unless --mask names one. Returns the recorded mask hash."""
    record = read_recorded(opt, PROG)
    if record is None:
        return None
    take_recorded_file(opt, record, "mask", "mask", "the mask", "--mask")
    return record.get("mask_hash")


class InpaintRun(Img2ImgRun):
    """img2img's run with a mask: the inpainting model sees it, or the kept region is blended back every step."""

    prog = PROG
    record_type = InpaintRecord

    def __init__(self, opt: argparse.Namespace):
        recorded_hash = apply_recorded_mask(opt)
        self.mask_image = load_init_image(opt.mask, "--mask", "the mask (white: repaint, black: keep)")
        super().__init__(opt)
        if self.mask_image.size != self.init_image.size:
            self.note(f"the mask is {self.mask_image.size[0]}x{self.mask_image.size[1]}, the init image "
                      f"{self.init_image.size[0]}x{self.init_image.size[1]}: both are resized to {opt.W}x{opt.H} "
                      f"(as diffusers does)")
        if np.asarray(self.mask_image.convert("L")).max() < 128:  # binarised at 0.5: 128/255 is the first white
            self.note(f"the mask {opt.mask} has no white (>= 50% grey): nothing will be repainted")
        self.mask_hash = ""
        if not opt.no_metadata:
            from ldm.checkpoints import model_hash
            self.mask_hash = model_hash(opt.mask)
        if recorded_hash and self.mask_hash and recorded_hash != self.mask_hash:
            self.note(f"{opt.mask} is not the mask {opt.metadata_from} was made with (hash {self.mask_hash}, "
                      f"recorded {recorded_hash}): the image will differ")
        self.inputs: dict[tuple[int, int], Any] = {}  # (W, H) -> InpaintingInputs at that size

    def check_model_kind(self, config: Any) -> None:
        """Inpainting and text-to-image models both inpaint (the latter by blending); the upscaler does not."""
        from ldm.cli.plan import refuse_upscaler

        refuse_upscaler(config, self.opt.ckpt)

    def make_plan(self, opt: argparse.Namespace) -> RunPlan:
        from ldm.models.diffusion.samplers import resolves_img2img

        plan = Run.make_plan(self, opt)  # img2img's sampler rule is looser for inpainting models at strength 1
        if is_inpainting_config(self.peek_config(opt)) and opt.strength == 1.0:
            return plan
        for image in plan.images:
            sampler = image.settings["sampler"]
            if not resolves_img2img(sampler):
                raise UsageError(f"inpainting cannot use the {sampler} sampler with a text-to-image checkpoint or "
                                 f"--strength below 1: use ddim (the default) or a k-diffusion sampler such as "
                                 f"euler_a or dpmpp_2m")
        return plan

    def inputs_at(self, width: int, height: int) -> Any:
        """The init image and mask prepared for images of width x height (encoded once per size)."""
        from ldm.models.diffusion.inpainting import InpaintingInputs, is_inpainting_model, latent_mask, masked_image

        if (width, height) not in self.inputs:
            image = image_to_tensor(self.init_image, width, height)
            mask = mask_to_tensor(self.mask_image, width, height)
            inpainting = is_inpainting_model(self.model)
            self.inputs[width, height] = InpaintingInputs(
                image_posterior=encode_init_image(self.model, image) if not inpainting or self.opt.strength < 1
                else None,
                mask=latent_mask(mask, height // self.opt.f, width // self.opt.f),
                masked_image_posterior=encode_init_image(self.model, masked_image(image, mask)) if inpainting
                else None)
        return self.inputs[width, height]

    def sample_latents(self, batch: list[PlannedImage], cond: Any, uncond: Any, sampler: str, steps: int,
                       eta: float | None) -> tuple[torch.Tensor, int]:
        from ldm.models.diffusion.inpainting import sample_inpaint
        from ldm.models.diffusion.samplers import img2img_steps

        settings = batch[0].settings
        inputs = self.inputs_at(settings["W"], settings["H"])
        latents = sample_inpaint(self.model, sampler, steps, inputs, self.opt.strength, cond, uncond,
                                 settings["scale"], ImageNoise([image.seed for image in batch]), eta=eta)
        return latents, img2img_steps(steps, self.opt.strength)

    def record(self, image: PlannedImage) -> InpaintRecord:
        return InpaintRecord(**super().record(image).to_mapping(), mask=self.opt.mask, mask_hash=self.mask_hash)


def main(argv: Sequence[str] | None = None) -> int:
    """Run inpainting with command-line `argv`; returns the exit status (0 done, 1 failed, 2 bad input)."""
    return run_main(argv, prog=PROG, parse=parse_args, run_type=InpaintRun)
