"""Stability's SD 2 x4 upscaler: latents sampled beside a noise-augmented low-resolution image, decoded at 4x.

The image is read as RGB at its own size (never resized) and scaled to [-1, 1]; each image of a batch noises it to
`noise_level` with its own seed (`ldm.models.diffusion.upscale.sample_upscale`).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from ldm.models.diffusion.upscale import sample_upscale
from ldm.pipeline.addons.base import AddOn, SampleCall
from ldm.pipeline.errors import UsageError
from ldm.pipeline.images import image_to_tensor
from ldm.pipeline.metadata import ExtraField
from ldm.pipeline.model_info import is_upscaler_config, model_geometry
from ldm.pipeline.request import nearest_multiples

if TYPE_CHECKING:
    from ldm.pipeline.pipeline import Pipeline, Setup
    from ldm.pipeline.request import Request

RELEASED_GEOMETRY = (4, 8)  # x4-upscaling.yaml: autoencoder factor (the upscaling factor), UNet downsampling
RELEASED_MAX_NOISE_LEVEL = 350


def not_an_upscaler(ckpt: str) -> str:
    return (f"{ckpt} is not the x4 upscaler (x4-upscaler-ema.ckpt, with configs/stable-diffusion/x4-upscaling.yaml): "
            f"to redraw an image with a text-to-image model use scripts/img2img.py")


def upscaler_geometry(config: Any) -> tuple[int, int]:
    """(upscaling factor = the autoencoder's, UNet downsampling) of the model; the released one's when the config
    cannot say (its problems are reported by the loader)."""
    try:
        factor, _, unet_factor = model_geometry(config)
    except (AttributeError, KeyError, TypeError):
        return RELEASED_GEOMETRY
    return factor, unet_factor


def max_noise_level(config: Any) -> int:
    try:
        return int(config.model.params.low_scale_config.params.max_noise_level)
    except (AttributeError, KeyError, TypeError, ValueError):
        return RELEASED_MAX_NOISE_LEVEL


class Upscale(AddOn):
    """Upscale the RGB PIL `image` (read from `path`, hashed as `image_hash`) after noising it to `noise_level`."""

    samples = True

    def __init__(self, image: Any, noise_level: int = 20, path: str = "", image_hash: str = ""):
        self.image, self.noise_level, self.path, self.image_hash = image, int(noise_level), path, image_hash
        self.low_res: torch.Tensor | None = None  # the image in [-1, 1], made once

    def output_size(self, config: Any) -> tuple[int, int]:
        """(width, height) of the upscaled image; UsageError when the image's sides do not fit the model."""
        factor, unet_factor = upscaler_geometry(config)
        width, height = self.image.size
        if width % unet_factor or height % unet_factor:
            raise UsageError(f"--init-img is {width}x{height}: this model takes sides that are multiples of "
                             f"{unet_factor} (the {factor}x output passes the UNet's {unet_factor}x downsampling); "
                             f"crop or pad it to a width of {nearest_multiples(width, unet_factor)} and a height of "
                             f"{nearest_multiples(height, unet_factor)}")
        return factor * width, factor * height

    def default_size(self, config: Any) -> tuple[int, int] | None:
        width, height = self.output_size(config)
        return height, width

    def check_noise_level(self, config: Any) -> None:
        highest = max_noise_level(config)
        if not 0 <= self.noise_level <= highest:
            raise UsageError(f"--noise_level {self.noise_level} is outside [0, {highest}]: 0 keeps the init image "
                             f"as it is, {highest} noises it most (Stability's and diffusers' default is 20)")

    def check_model_kind(self, config: Any, ckpt: str) -> None:
        if not is_upscaler_config(config):
            raise UsageError(not_an_upscaler(ckpt))

    def check(self, setup: Setup, requests: Sequence[Request]) -> None:
        self.check_noise_level(setup.config)
        width, height = self.output_size(setup.config)
        for request in requests:  # a prompt-file line or a sidecar can carry its own size
            if (request.width, request.height) != (width, height):
                raise UsageError(f"a size of {request.width}x{request.height} is asked for, but the output is 4x the "
                                 f"init image, {width}x{height}: drop W and H from the prompt file (or pass the init "
                                 f"image the metadata was made from)")

    def sample(self, pipeline: Pipeline, call: SampleCall) -> tuple[torch.Tensor, int]:
        if self.low_res is None:
            self.low_res = image_to_tensor(self.image, *self.image.size)  # its own size: no resampling
        request = call.request
        latents = sample_upscale(pipeline.model, call.sampler, call.steps, self.low_res, self.noise_level, call.cond,
                                 call.uncond, request.scale, pipeline.noise(request), eta=call.eta)
        return latents, call.steps

    def record(self, request: Request, index: int) -> dict[str, Any]:
        return {"extras": [ExtraField("noise_level", self.noise_level, "Noise level", str(self.noise_level)),
                           ExtraField("init_image", self.path, "Init image", Path(self.path).name),
                           ExtraField("init_image_hash", self.image_hash, "Init image hash", self.image_hash)]}
