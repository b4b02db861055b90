"""txt2img --controlnet / --control_image / --control_scale: one ControlNet steering every batch.

Everything is checked before any model loads (both files exist, the image reads, the file holds a ControlNet for the
--ckpt's family). The control image is used as given, no preprocessor runs: pass what the ControlNet was trained on
(a canny edge map for *_canny, a pose skeleton for *_openpose, ...). As ControlNet's own scripts do, it is resized to
the output size and fed as RGB in [0, 1]; it serves every image of a batch and both halves of guidance.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from ldm.cli.arguments import UsageError
from ldm.cli.metadata import ImageRecord

FAMILY_BY_CONTEXT_WIDTH = {768: "v1", 1024: "v2"}  # the --ckpt families a ControlNet's text width belongs to


@dataclass
class ControlNetRecord(ImageRecord):
    """A txt2img image's settings, plus the ControlNet, control image and strength that steered it."""

    controlnet: str = ""
    controlnet_hash: str = ""
    control_image: str = ""
    control_image_hash: str = ""
    control_scale: float = 1.0

    def extra_parameters(self) -> list[tuple[str, str]]:
        pairs = [("ControlNet", self.controlnet), ("ControlNet hash", self.controlnet_hash),
                 ("Control image", self.control_image), ("Control image hash", self.control_image_hash),
                 ("Control scale", repr(float(self.control_scale)))]
        return [(key, value) for key, value in pairs if value]


def _check_family(opt: argparse.Namespace, weights: dict) -> None:
    """The ControlNet and --ckpt must share a text encoder width: SD 1.x ControlNets on SD 1.x models, and so on."""
    from ldm.checkpoints import CheckpointError, read_shapes
    from ldm.controlnet import base_model_name, context_width_of
    from ldm.loading import LoadError, detect_family

    try:
        family = detect_family(read_shapes(opt.ckpt))
    except (CheckpointError, LoadError):
        return  # the model's own loading reports what is wrong with --ckpt
    width = context_width_of(weights)
    wanted = FAMILY_BY_CONTEXT_WIDTH.get(width)
    if family not in ("v1", "v2"):
        raise UsageError(f"--controlnet needs an SD 1.x or 2.x text-to-image model as --ckpt; {opt.ckpt} is {family}")
    if wanted is not None and wanted != family:
        raise UsageError(f"--controlnet {opt.controlnet} is a ControlNet for {base_model_name(width)} but --ckpt "
                         f"{opt.ckpt} is {base_model_name(768 if family == 'v1' else 1024)}: use a ControlNet made for "
                         f"the model's family")


class ControlNetRun:
    """The --controlnet of a run; `controlnet` is set by `load`, and `attach` keeps it attached at the batch's size."""

    def __init__(self, path: str, image_path: str, image: Any, scale: float, recorded: dict[str, Any] | None = None,
                 note: Callable[[str], None] = print):
        self.path, self.image_path, self.image, self.scale = path, image_path, image, scale
        self.recorded, self.note = recorded or {}, note
        self.controlnet: Any = None
        self.attached: Any = None
        self.size: tuple[int, int] | None = None
        self.hashes = ("", "")

    @classmethod
    def from_flags(cls, opt: argparse.Namespace, prog: str, recorded: dict[str, Any],
                   note: Callable[[str], None]) -> "ControlNetRun | None":
        """The ControlNet the flags ask for (None without --controlnet); UsageError (one line) for what cannot run.

        `recorded`: what the --metadata_from image records (its scale is used unless --control_scale is given)."""
        from ldm.checkpoints import CheckpointError, read_shapes
        from ldm.cli.img2img import load_init_image
        from ldm.controlnet import controlnet_weights
        from ldm.loading import LoadError

        if opt.controlnet is None and recorded.get("controlnet"):
            note(f"{opt.metadata_from} was steered by the ControlNet {recorded['controlnet']} with the control image "
                 f"{recorded.get('control_image')}: pass --controlnet and --control_image with those files to make "
                 f"the same image (its scale is taken from the metadata)")
        if opt.controlnet is None:
            for flag, value in (("--control_image", opt.control_image), ("--control_scale", opt.control_scale)):
                if value is not None:
                    raise UsageError(f"{flag} needs --controlnet (a ControlNet file such as "
                                     f"control_v11p_sd15_canny.pth)")
            return None
        if prog != "txt2img.py":
            raise UsageError(f"--controlnet works with txt2img.py only; {prog} does not take it yet")
        scale = float(recorded.get("control_scale", 1.0)) if opt.control_scale is None else opt.control_scale
        if not 0.0 <= scale <= 2.0:  # also refuses NaN
            raise UsageError(f"--control_scale {scale} is outside [0, 2]: it is the ControlNet's strength (1.0 as "
                             f"trained, 0 for none)")
        if not os.path.isfile(opt.controlnet):
            raise UsageError(f"--controlnet {opt.controlnet} not found: pass a ControlNet file "
                             f"(control_v11p_sd15_canny.pth / .safetensors, ...)")
        try:
            weights = controlnet_weights(read_shapes(opt.controlnet), opt.controlnet)
        except (CheckpointError, LoadError) as error:
            raise UsageError(f"--controlnet: {error}") from None
        if opt.refiner is not None:
            raise UsageError("--controlnet and --refiner cannot be combined: the refiner is SDXL, these ControlNets "
                             "are SD 1.x/2.x")
        _check_family(opt, weights)
        image = load_init_image(opt.control_image, "--control_image",
                                "the control image the ControlNet expects (an edge map, pose image, ...)")
        return cls(opt.controlnet, opt.control_image, image, scale, recorded, note)

    def load(self, device: torch.device, dtype: torch.dtype, with_hashes: bool) -> None:
        from ldm.checkpoints import model_hash
        from ldm.controlnet import load_controlnet
        from ldm.loading import LoadError

        print(f"Loading ControlNet from {self.path}", flush=True)
        try:
            self.controlnet = load_controlnet(self.path, device=device, dtype=dtype)
        except LoadError as error:
            raise UsageError(f"--controlnet: {error}") from None
        if with_hashes:
            self.hashes = (model_hash(self.path), model_hash(self.image_path))
            for what, key, actual in (("ControlNet", "controlnet_hash", self.hashes[0]),
                                      ("control image", "control_image_hash", self.hashes[1])):
                if self.recorded.get(key) and self.recorded[key] != actual:
                    self.note(f"the image being remade used a {what} with hash {self.recorded[key]}, this one is "
                              f"{actual}: the image will differ")

    def attach(self, model: Any, height: int, width: int) -> None:
        """Steer `model` with the control image at height x width (re-attached when a batch's size differs)."""
        from ldm.cli.img2img import image_to_tensor
        from ldm.controlnet import attach_controlnet

        if self.size == (height, width):
            return
        if self.attached is not None:
            self.attached.remove()
        hint = (image_to_tensor(self.image, width, height) + 1.0) / 2.0  # [-1, 1] -> RGB in [0, 1], as ControlNet
        try:
            self.attached = attach_controlnet(model, self.controlnet, hint, self.scale)
        except ValueError as error:
            raise UsageError(f"--controlnet: {error}") from None
        self.size = (height, width)

    def record(self, record: ImageRecord) -> ControlNetRecord:
        return ControlNetRecord(**record.to_mapping(), controlnet=Path(self.path).name, controlnet_hash=self.hashes[0],
                                control_image=Path(self.image_path).name, control_image_hash=self.hashes[1],
                                control_scale=self.scale)
