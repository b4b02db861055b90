"""ControlNet: one ControlNet steering every batch with one control image.

Everything is checked before any model loads (both files exist, the image reads, the file holds a ControlNet for the
checkpoint's family). The control image is used as given, no preprocessor runs: pass what the ControlNet was trained
on (a canny edge map for *_canny, a pose skeleton for *_openpose, ...). As ControlNet's own scripts do, it is resized
to the output size and fed as RGB in [0, 1]; it serves every image of a batch and both halves of guidance.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ldm.checkpoints import CheckpointError, model_hash
from ldm.controlnet import (attach_controlnet, base_model_name, context_width_of, controlnet_hash, controlnet_weights,
                            load_controlnet, read_controlnet)
from ldm.loading import LoadError, checkpoint_shapes, detect_family
from ldm.pipeline.addons.base import AddOn
from ldm.pipeline.addons.refiner import Refiner
from ldm.pipeline.errors import UsageError
from ldm.pipeline.images import image_to_tensor, load_image
from ldm.pipeline.metadata import ExtraField

if TYPE_CHECKING:
    from ldm.pipeline.pipeline import Pipeline, Setup
    from ldm.pipeline.request import Request

FAMILY_BY_CONTEXT_WIDTH = {768: "v1", 1024: "v2"}  # the checkpoint families a ControlNet's text width belongs to
MAX_SCALE = 2.0


class ControlNet(AddOn):
    """The ControlNet file at `path` steering with the image at `image_path` at strength `scale`; `recorded` holds
    the hashes an image being made again recorded (a different file gets a note)."""

    def __init__(self, path: str, image_path: str | None, scale: float = 1.0,
                 recorded: dict[str, Any] | None = None):
        if not 0.0 <= scale <= MAX_SCALE:  # also refuses NaN
            raise UsageError(f"--control_scale {scale} is outside [0, {MAX_SCALE:g}]: it is the ControlNet's strength "
                             f"(1.0 as trained, 0 for none)")
        if not os.path.exists(path):
            raise UsageError(f"--controlnet {path} not found: pass a ControlNet file "
                             f"(control_v11p_sd15_canny.pth / .safetensors, ...) or diffusers ControlNet folder")
        try:
            self.weights = controlnet_weights(read_controlnet(path, shapes_only=True), path)
        except (CheckpointError, LoadError) as error:
            raise UsageError(f"--controlnet: {error}") from None
        self.path, self.image_path, self.scale = path, image_path, float(scale)
        self.recorded = recorded or {}
        self.image: Any = None
        self.controlnet: Any = None
        self.attached: Any = None
        self.size: tuple[int, int] | None = None
        self.hashes = ("", "")

    def check(self, setup: Setup, requests: Sequence[Request]) -> None:
        """The ControlNet and the checkpoint must share a text encoder width (SD 1.x ControlNets on SD 1.x models,
        and so on); the control image must read."""
        if any(isinstance(addon, Refiner) for addon in setup.addons):
            raise UsageError("--controlnet and --refiner cannot be combined: the refiner is SDXL, these ControlNets "
                             "are SD 1.x/2.x")
        try:
            family = detect_family(checkpoint_shapes(setup.ckpt))
        except (CheckpointError, LoadError):
            family = None  # the model's own loading reports what is wrong with the checkpoint
        if family is not None:
            self._check_family(family, setup.ckpt)
        self.image = load_image(self.image_path, "--control_image",
                                "the control image the ControlNet expects (an edge map, pose image, ...)")

    def _check_family(self, family: str, ckpt: str) -> None:
        width = context_width_of(self.weights)
        wanted = FAMILY_BY_CONTEXT_WIDTH.get(width)
        if family not in ("v1", "v2"):
            raise UsageError(f"--controlnet needs an SD 1.x or 2.x text-to-image model as --ckpt; {ckpt} is {family}")
        if wanted is not None and wanted != family:
            raise UsageError(f"--controlnet {self.path} is a ControlNet for {base_model_name(width)} but --ckpt "
                             f"{ckpt} is {base_model_name(768 if family == 'v1' else 1024)}: use a ControlNet made "
                             f"for the model's family")

    def load(self, pipeline: Pipeline) -> None:
        pipeline.info(f"Loading ControlNet from {self.path}")
        try:
            self.controlnet = load_controlnet(self.path, device=pipeline.device, dtype=pipeline.dtype,
                                              trust_config=pipeline.options.trust_config)
        except LoadError as error:
            raise UsageError(f"--controlnet: {error}") from None
        if not pipeline.options.hash_files:
            return
        self.hashes = (controlnet_hash(self.path), model_hash(self.image_path))
        for what, key, actual in (("ControlNet", "controlnet_hash", self.hashes[0]),
                                  ("control image", "control_image_hash", self.hashes[1])):
            if self.recorded.get(key) and self.recorded[key] != actual:
                pipeline.note(f"the image being remade used a {what} with hash {self.recorded[key]}, this one is "
                              f"{actual}: the image will differ")

    def before_sampling(self, pipeline: Pipeline, request: Request) -> None:
        """Steer the model with the control image at the batch's size (attached again when the size changes)."""
        height, width = request.size
        if self.size == (height, width):
            return
        if self.attached is not None:
            self.attached.remove()
        hint = (image_to_tensor(self.image, width, height) + 1.0) / 2.0  # [-1, 1] -> RGB in [0, 1], as ControlNet
        try:
            self.attached = attach_controlnet(pipeline.model, self.controlnet, hint, self.scale)
        except ValueError as error:
            raise UsageError(f"--controlnet: {error}") from None
        self.size = (height, width)

    def record(self, request: Request, index: int) -> dict[str, Any]:
        pairs = [("controlnet", "ControlNet", Path(self.path).name), ("controlnet_hash", "ControlNet hash",
                                                                        self.hashes[0]),
                 ("control_image", "Control image", Path(self.image_path or "").name),
                 ("control_image_hash", "Control image hash", self.hashes[1]),
                 ("control_scale", "Control scale", self.scale)]
        return {"extras": [ExtraField(key, value, label, value if isinstance(value, str) else repr(float(value)))
                           for key, label, value in pairs]}
