"""`scripts/img2img.py`: the CompVis img2img script (same flags and defaults): txt2img's shell with the
`ldm.pipeline.InitImage` add-on, sized from the init image."""
from __future__ import annotations

import argparse
import math
import os
from typing import Any, Sequence

from ldm.checkpoints import model_hash
from ldm.cli import arguments
from ldm.cli.arguments import refuse_flags, sampler_from_flags
from ldm.cli.plan import peek_config
from ldm.cli.txt2img import Shell
from ldm.cli.txt2img import main as run_main
from ldm.pipeline import AddOn, InitImage
from ldm.pipeline.addons.init_image import IMG2IMG_RULES
from ldm.pipeline.errors import UsageError
from ldm.pipeline.images import load_image
from ldm.pipeline.metadata import check_made_by, read_metadata_file
from ldm.pipeline.model_info import model_geometry

PROG = "img2img.py"
MAX_DEFAULT_SIDE = 2048  # pixels: an init image's own size is used up to this, larger ones need --W/--H
DEFAULT_SIZE_MULTIPLE = 64  # autoencoder 8x times the SD UNet's 8x: the sizes every SD 1.x/2.x model takes
DESCRIPTION = "Image to image with Stable Diffusion (the CompVis img2img script, with the same flags)."
EPILOG = """\
init image: loaded as RGB and resized (LANCZOS) to --W x --H, by default its own size rounded down to a multiple
of 64 (CompVis rounds to 32, which the SD UNet cannot take for odd multiples of 32); an image larger than 2048
pixels a side needs --W and --H. --strength s noises it
int(s * ddim_steps) steps deep (t_enc) and runs those steps back: 0 keeps the image (through the autoencoder),
1 starts from pure noise. ddim noises as CompVis does (one DDIM step above the first step it runs), k-diffusion
samplers to the sigma of their first step (as A1111 and diffusers); plms and dpm_solver cannot start from an image.
Each image's posterior sample and noise come from its own seed.

""" + arguments.EPILOG
# txt2img flags that make no sense here: hidden from --help and refused when given
TXT2IMG_ONLY = {"laion400m": "selects CompVis' LAION-400M text-to-image model",
                "refiner": "hands SDXL's text-to-image sampling over to a refiner",
                "refiner_switch": "is where --refiner takes over",
                "hr_scale": "is txt2img's hires fix", "hr_resize_x": "is txt2img's hires fix",
                "hr_resize_y": "is txt2img's hires fix", "hr_second_pass_steps": "is txt2img's hires fix"}


def build_parser() -> argparse.ArgumentParser:
    """txt2img's parser with the CompVis img2img defaults, --init-img and --strength."""
    parser = arguments.build_parser()
    parser.prog, parser.description, parser.epilog = PROG, DESCRIPTION, EPILOG
    parser.set_defaults(outdir="outputs/img2img-samples", n_iter=1, n_samples=2, scale=5.0)
    helps = {
        "H": "resize the init image to this height (default: its own, rounded down to a multiple of 64)",
        "W": "resize the init image to this width (default: its own, rounded down to a multiple of 64)",
        "plms": "refused, as in CompVis' img2img: PLMS cannot start from an image here (use --sampler)",
        "dpm_solver": "refused: DPM-Solver cannot start from an image here (use --sampler)",
    }
    for action in parser._actions:  # argparse has no public way to edit an added flag
        if action.dest in TXT2IMG_ONLY:
            action.help = argparse.SUPPRESS
        elif action.dest in helps:
            action.help = helps[action.dest]
    parser.add_argument("--init-img", type=str, nargs="?", default=None, help="path to the input image")
    parser.add_argument("--strength", type=float, default=0.75,
                        help="strength for noising/unnoising: 0 keeps the init image, 1.0 destroys all of its "
                             "information; int(strength * ddim_steps) steps run")
    parser.add_argument("--img2img_steps", type=str, choices=IMG2IMG_RULES, default="diffusers",
                        help="how k-diffusion samplers count the steps a --strength runs: diffusers = "
                             "int(strength * ddim_steps) (CompVis, diffusers), a1111 = one more, from one sigma "
                             "higher, as AUTOMATIC1111 does (the default for its infotexts); ddim is CompVis' either "
                             "way")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return arguments.parse_with_given(build_parser(), argv)


# --- flags to the init image -----------------------------------------------------------------------------------------
def fit_size(width: int, height: int, multiple: int) -> tuple[int, int]:
    """(width, height) rounded down to multiples of `multiple`; UsageError when a side is smaller than that, or
    larger than MAX_DEFAULT_SIDE (a photo's own size is rarely the size meant, and it would need many GiB)."""
    if max(width, height) > MAX_DEFAULT_SIDE:
        raise UsageError(f"--init-img is {width}x{height}, larger than {MAX_DEFAULT_SIDE} pixels a side: pass --W "
                         f"and --H to resize it (e.g. --W 512 --H 512)")
    if width < multiple or height < multiple:
        raise UsageError(f"--init-img is {width}x{height}, smaller than the model's {multiple}-pixel minimum: "
                         f"use a larger image or pass --W/--H to enlarge it")
    return width - width % multiple, height - height % multiple


def size_multiple(opt: argparse.Namespace) -> int:
    """The multiple every side must be for this model (autoencoder factor times UNet factor)."""
    try:
        f, _, unet_factor = model_geometry(peek_config(opt))
    except (AttributeError, KeyError, TypeError):  # no readable config yet: its problems are reported later
        return DEFAULT_SIZE_MULTIPLE
    return math.lcm(f * unet_factor, 8)


def read_recorded(opt: argparse.Namespace, prog: str) -> dict[str, Any] | None:
    """The --metadata_from record (None without the flag); UsageError (one line) when it cannot be read or another
    script than `prog` made its image."""
    if not opt.metadata_from:
        return None
    try:
        record = read_metadata_file(opt.metadata_from)
        check_made_by(record, opt.metadata_from, prog)
    except ValueError as error:
        raise UsageError(str(error)) from None
    return record


def take_recorded_file(opt: argparse.Namespace, record: dict[str, Any], attribute: str, key: str, what: str,
                       flag: str) -> None:
    """`opt.<attribute>` := the file `record[key]` when the flag did not name one; it must exist here (a PNG records
    only a file's name)."""
    if getattr(opt, attribute) is not None:
        return
    path = record.get(key)
    setattr(opt, attribute, path)
    if not path or not os.path.isfile(path):
        raise UsageError(f"{opt.metadata_from} was made from {what} {path or '(none recorded)'}, which is not found "
                         f"here: pass it with {flag}")


def file_hash(shell: Shell, path: str, recorded_hash: str | None, what: str) -> str:
    """The hash of the file at `path` for the metadata ("" with --no_metadata), with a note when --metadata_from
    recorded another one for it."""
    opt = shell.opt
    if opt.no_metadata:
        return ""
    actual = model_hash(path)
    if recorded_hash and recorded_hash != actual:
        made = "with" if what == "mask" else "from"
        shell.note(f"{path} is not the {what} {opt.metadata_from} was made {made} (hash {actual}, recorded "
                   f"{recorded_hash}): the image will differ")
    return actual


class Img2ImgShell(Shell):
    """txt2img's shell, starting every batch from the encoded init image instead of pure noise."""

    prog = PROG

    def prepare(self, opt: argparse.Namespace) -> None:
        refuse_flags(opt, TXT2IMG_ONLY, "img2img")
        record = read_recorded(opt, self.prog) or {}
        if record:
            opt.strength = float(record["strength"])
            take_recorded_file(opt, record, "init_img", "init_image", "the init image", "--init-img")
        self.recorded_init_hash = record.get("init_image_hash")
        if not 0.0 <= opt.strength <= 1.0:  # also refuses NaN
            raise UsageError(f"--strength {opt.strength} is outside [0, 1]: 0 keeps the init image, 1 replaces it")
        self.init_image = load_image(opt.init_img)
        if opt.W is None or opt.H is None:
            width, height = fit_size(*self.init_image.size, size_multiple(opt))
            opt.W = width if opt.W is None else opt.W
            opt.H = height if opt.H is None else opt.H

    def sampling_addon(self) -> AddOn | None:
        image_hash = file_hash(self, self.opt.init_img, self.recorded_init_hash, "init image")
        self.addon = InitImage(self.init_image, self.opt.strength, self.opt.init_img, image_hash,
                               self.opt.img2img_steps)
        return self.addon

    def load(self) -> None:
        super().load()
        t_enc = self.addon.steps_for(sampler_from_flags(self.opt), self.opt.ddim_steps)
        print(f"target t_enc is {t_enc} steps", flush=True)
        if t_enc == 0 and self.opt.strength > 0:
            self.note(f"--strength {self.opt.strength} of {self.opt.ddim_steps} steps runs no step: the images are "
                      f"the init image through the autoencoder (raise --strength or --ddim_steps)")


def main(argv: Sequence[str] | None = None) -> int:
    """Run img2img with command-line `argv`; returns the exit status (0 done, 1 failed, 2 bad input)."""
    return run_main(argv, prog=PROG, parse=parse_args, shell=Img2ImgShell)
