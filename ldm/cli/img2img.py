"""`scripts/img2img.py`: the CompVis img2img script (same flags and defaults) on the txt2img run machinery.

An init image is loaded as RGB, resized with LANCZOS to a size the model takes, scaled to [-1, 1] and encoded by the
autoencoder; each image of a batch samples that posterior with its own seed, is noised part of the way and denoised
by `ldm.models.diffusion.samplers.sample_img2img`. Everything else (plan, seeds, saving, metadata, summary) is
txt2img's `Run`.
"""
from __future__ import annotations

import argparse
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ldm.cli import arguments
from ldm.cli.arguments import UsageError, refuse_flags
from ldm.cli.generation import first_stage_dtype
from ldm.cli.metadata import ImageRecord, check_made_by, read_metadata_file
from ldm.cli.plan import PlannedImage, RunPlan, model_geometry
from ldm.cli.txt2img import Run
from ldm.cli.txt2img import main as run_main
from ldm.models.diffusion.noise import ImageNoise

PROG = "img2img.py"
DEFAULT_SIZE_MULTIPLE = 64  # autoencoder 8x times the SD UNet's 8x: the sizes every SD 1.x/2.x model takes
DESCRIPTION = "Image to image with Stable Diffusion (the CompVis img2img script, with the same flags)."
EPILOG = """\
init image: loaded as RGB and resized (LANCZOS) to --W x --H, by default its own size rounded down to a multiple
of 64 (CompVis rounds to 32, which the SD UNet cannot take for odd multiples of 32). --strength s noises it
int(s * ddim_steps) steps deep (t_enc) and runs those steps back: 0 keeps the image (through the autoencoder),
1 starts from pure noise. ddim noises as CompVis does (one DDIM step above the first step it runs), k-diffusion
samplers to the sigma of their first step (as A1111 and diffusers); plms and dpm_solver cannot start from an image.
Each image's posterior sample and noise come from its own seed.

""" + arguments.EPILOG
# txt2img flags that make no sense here: hidden from --help and refused when given
TXT2IMG_ONLY = {"laion400m": "selects CompVis' LAION-400M text-to-image model",
                "refiner": "hands SDXL's text-to-image sampling over to a refiner",
                "refiner_switch": "is where --refiner takes over"}


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
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


# --- the init image ---------------------------------------------------------------------------------------------------
def load_init_image(path: str | None, flag: str = "--init-img", purpose: str = "the image to start from") -> Any:
    """The image at `path` (given with `flag`) as an RGB PIL image, fully read; UsageError (one line) when it cannot
    be."""
    from PIL import Image, UnidentifiedImageError

    if not path:
        raise UsageError(f"{flag} is required: pass {purpose} (PNG, JPEG, ...)")
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path} is a folder: pass the path of an image file")
    if not os.path.isfile(path):
        raise UsageError(f"{flag} {path} not found: pass the path of an image file")
    try:
        with Image.open(path) as image:
            return as_rgb(image)
    except UnidentifiedImageError:
        raise UsageError(f"{flag} {path} is not an image PIL can read: use a PNG, JPEG or WebP file") from None
    except Image.DecompressionBombError as error:  # PIL refuses to decode images this large
        raise UsageError(f"{flag} {path} is too large to open safely ({str(error).split(',')[0]}): scale it "
                         f"down first") from None
    except (OSError, ValueError) as error:  # truncated or damaged files fail while decoding
        raise UsageError(f"{flag} {path} cannot be read: {error}") from None


def as_rgb(image: Any) -> Any:
    """An 8-bit RGB copy of PIL `image`. 16-bit grey (PIL modes I;16*, and I holding values past 255) is scaled to
    8 bits and float grey (F) from [0, 1], where PIL's own convert would clip them to white or black."""
    from PIL import Image

    if image.mode.startswith("I") or image.mode == "F":
        grey = np.asarray(image, dtype=np.float64)
        if image.mode == "F":
            grey = grey * 255.0 if grey.max(initial=0.0) <= 1.0 else grey
        elif image.mode.startswith("I;16") or grey.max(initial=0.0) > 255:
            grey = grey / 257.0  # 65535 -> 255
        return Image.fromarray(np.clip(np.round(grey), 0, 255).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def fit_size(width: int, height: int, multiple: int) -> tuple[int, int]:
    """(width, height) rounded down to multiples of `multiple`; UsageError when a side is smaller than that."""
    if width < multiple or height < multiple:
        raise UsageError(f"--init-img is {width}x{height}, smaller than the model's {multiple}-pixel minimum: "
                         f"use a larger image or pass --W/--H to enlarge it")
    return width - width % multiple, height - height % multiple


def image_to_tensor(image: Any, width: int, height: int) -> torch.Tensor:
    """RGB PIL `image` resized (LANCZOS) to width x height, as [1, 3, H, W] float32 in [-1, 1] (CompVis `load_img`)."""
    from PIL import Image

    resized = image.resize((width, height), resample=Image.LANCZOS)
    pixels = np.asarray(resized).astype(np.float32) / 255.0  # [H, W, 3]
    return 2.0 * torch.from_numpy(pixels).permute(2, 0, 1)[None] - 1.0


def encode_init_image(model: Any, image: torch.Tensor) -> Any:
    """The autoencoder's posterior of one image [1, 3, H, W] in [-1, 1]."""
    return model.encode_first_stage(image.to(device=model.device, dtype=first_stage_dtype(model)))


def init_latents(model: Any, posterior: Any, noise: ImageNoise) -> torch.Tensor:
    """One posterior sample per seed of `noise`, each the first draw of its image's stream (see `encoded_latents`)."""
    from ldm.models.diffusion.samplers import encoded_latents

    return encoded_latents(model, posterior, noise)


# --- the run ----------------------------------------------------------------------------------------------------------
@dataclass
class Img2ImgRecord(ImageRecord):
    """An img2img image's settings: txt2img's plus the strength and which init image it started from."""

    strength: float = 0.75
    init_image: str = ""  # the --init-img path as given
    init_image_hash: str = ""  # first 10 hex digits of its SHA-256

    def extra_parameters(self) -> list[tuple[str, str]]:
        pairs = [("Denoising strength", repr(float(self.strength))), ("Init image", Path(self.init_image).name)]
        return pairs + ([("Init image hash", self.init_image_hash)] if self.init_image_hash else [])


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


def apply_recorded_img2img_settings(opt: argparse.Namespace, prog: str = PROG) -> str | None:
    """--metadata_from an img2img image: its strength, and its init image unless --init-img names one. Returns the
    recorded init image hash, to compare with the file's."""
    record = read_recorded(opt, prog)
    if record is None:
        return None
    opt.strength = float(record["strength"])
    take_recorded_file(opt, record, "init_img", "init_image", "the init image", "--init-img")
    return record.get("init_image_hash")


def hash_init_image(run: Run, recorded_hash: str | None) -> str:
    """The hash of `run`'s --init-img for the metadata ("" with --no_metadata), with a note when --metadata_from
    recorded another one."""
    opt = run.opt
    if opt.no_metadata:
        return ""
    from ldm.checkpoints import model_hash
    init_image_hash = model_hash(opt.init_img)
    if recorded_hash and recorded_hash != init_image_hash:
        run.note(f"{opt.init_img} is not the init image {opt.metadata_from} was made from (hash {init_image_hash}, "
                 f"recorded {recorded_hash}): the image will differ")
    return init_image_hash


class Img2ImgRun(Run):
    """txt2img's run, starting every batch from the encoded init image instead of pure noise."""

    prog = PROG
    record_type = Img2ImgRecord

    def __init__(self, opt: argparse.Namespace):
        refuse_flags(opt, TXT2IMG_ONLY, "img2img")
        recorded_hash = apply_recorded_img2img_settings(opt, self.prog)
        if not 0.0 <= opt.strength <= 1.0:  # also refuses NaN
            raise UsageError(f"--strength {opt.strength} is outside [0, 1]: 0 keeps the init image, 1 replaces it")
        self.init_image = load_init_image(opt.init_img)
        multiple = self.size_multiple(opt)
        width, height = fit_size(*self.init_image.size, multiple)
        opt.W = width if opt.W is None else opt.W
        opt.H = height if opt.H is None else opt.H
        super().__init__(opt)
        self.init_image_hash = hash_init_image(self, recorded_hash)
        self.posteriors: dict[tuple[int, int], Any] = {}  # (W, H) -> the encoded init image at that size

    def size_multiple(self, opt: argparse.Namespace) -> int:
        """The multiple every side must be for this model (autoencoder factor times UNet factor)."""
        config = self.peek_config(opt)
        try:
            f, _, unet_factor = model_geometry(config)
        except (AttributeError, KeyError, TypeError):  # no readable config yet: its problems are reported later
            return DEFAULT_SIZE_MULTIPLE
        return math.lcm(f * unet_factor, 8)

    def make_plan(self, opt: argparse.Namespace) -> RunPlan:
        from ldm.models.diffusion.samplers import resolves_img2img

        plan = super().make_plan(opt)
        for image in plan.images:
            sampler = image.settings["sampler"]
            if not resolves_img2img(sampler):
                raise UsageError(f"img2img cannot use the {sampler} sampler (CompVis' img2img refuses plms too): "
                                 f"use ddim (the default) or a k-diffusion sampler such as euler_a or dpmpp_2m")
        return plan

    def load(self) -> None:
        from ldm.models.diffusion.samplers import img2img_steps

        super().load()
        t_enc = img2img_steps(self.opt.ddim_steps, self.opt.strength)
        print(f"target t_enc is {t_enc} steps", flush=True)
        if t_enc == 0 and self.opt.strength > 0:
            self.note(f"--strength {self.opt.strength} of {self.opt.ddim_steps} steps runs no step: the images are "
                      f"the init image through the autoencoder (raise --strength or --ddim_steps)")

    def warm_up_steps(self) -> int:
        """Enough DDIM steps that int(strength * steps) is one: the warm-up runs the UNet once, as txt2img's does."""
        if self.opt.strength == 0:
            return 1
        steps = math.ceil(1 / self.opt.strength)
        return steps if int(self.opt.strength * steps) >= 1 else steps + 1  # float rounding of strength * steps

    def sample_latents(self, batch: list[PlannedImage], cond: Any, uncond: Any, sampler: str, steps: int,
                       eta: float | None) -> tuple[torch.Tensor, int]:
        from ldm.models.diffusion.samplers import img2img_steps, sample_img2img

        settings = batch[0].settings
        size = (settings["W"], settings["H"])
        if size not in self.posteriors:
            self.posteriors[size] = encode_init_image(self.model, image_to_tensor(self.init_image, *size))
        noise = ImageNoise([image.seed for image in batch])
        x_init = init_latents(self.model, self.posteriors[size], noise)
        latents = sample_img2img(self.model, sampler, steps, x_init, self.opt.strength, cond, uncond,
                                 settings["scale"], noise, eta=eta)
        return latents, img2img_steps(steps, self.opt.strength)

    def record(self, image: PlannedImage) -> Img2ImgRecord:
        return Img2ImgRecord(**super().record(image).to_mapping(), strength=self.opt.strength,
                             init_image=self.opt.init_img, init_image_hash=self.init_image_hash)


def main(argv: Sequence[str] | None = None) -> int:
    """Run img2img with command-line `argv`; returns the exit status (0 done, 1 failed, 2 bad input)."""
    return run_main(argv, prog=PROG, parse=parse_args, run_type=Img2ImgRun)
