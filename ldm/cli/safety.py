"""The optional safety checker: a local diffusers-format `StableDiffusionSafetyChecker` folder, never downloaded."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ldm.cli.images import MissingDependency


class SafetyChecker:
    """Flags images with the CompVis/diffusers safety checker; imports its packages only when the flag is given.

    `path` is a folder as `save_pretrained` writes it: config.json and weights of the checker, and the
    preprocessor_config.json of its CLIP image processor. OSError/ValueError if they cannot be read.
    """

    def __init__(self, path: str):
        try:
            from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
            from transformers import CLIPImageProcessor
        except ImportError:
            raise MissingDependency("--safety_checker needs the diffusers and transformers packages: "
                                    "pip install diffusers transformers (or run without --safety_checker)") from None
        self.model = StableDiffusionSafetyChecker.from_pretrained(path, local_files_only=True).eval()
        self.processor = CLIPImageProcessor.from_pretrained(path, local_files_only=True)

    def flags(self, images: Sequence[np.ndarray]) -> list[bool]:
        """For each uint8 [H, W, 3] image, whether the checker flags it."""
        import torch
        from PIL import Image

        clip_input = self.processor([Image.fromarray(image) for image in images], return_tensors="pt").pixel_values
        as_float = np.stack([image.astype(np.float32) / 255.0 for image in images])
        with torch.no_grad():
            _, flagged = self.model(images=as_float, clip_input=clip_input.to(self.model.dtype))
        return [bool(flag) for flag in flagged]
