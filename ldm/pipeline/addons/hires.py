"""Hires fix, as AUTOMATIC1111 does it: make the image at the asked size, upscale it, and run a second, img2img pass
at the larger size.

The first pass is plain text to image. The upscale is in latent space (the "Latent ..." upscalers: torch's
interpolation with AUTOMATIC1111's mode and antialiasing) or in pixels (Lanczos, Nearest: decode, resize with PIL,
encode again). The second pass starts from fresh noise of each image's seed at the larger size, runs
`second_pass_steps` (default: the request's steps) over a schedule stretched so that `denoising_strength` of it
remains, as AUTOMATIC1111's img2img does with fixed steps, and is conditioned for the larger size (SDXL).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ldm.models.diffusion.samplers import encoded_latents, sample, sample_img2img
from ldm.pipeline.addons.base import AddOn, SampleCall
from ldm.pipeline.addons.init_image import check_samplers_start_from_image, encode_image
from ldm.pipeline.decoding import to_uint8
from ldm.pipeline.errors import UsageError
from ldm.pipeline.metadata import ExtraField
from ldm.pipeline.model_info import refuse_special_models

if TYPE_CHECKING:
    from ldm.pipeline.pipeline import Pipeline, Setup
    from ldm.pipeline.request import Request

# AUTOMATIC1111's latent upscalers (modules/shared.py latent_upscale_modes): torch interpolation mode, antialias
LATENT_UPSCALERS = {"Latent": ("bilinear", False), "Latent (antialiased)": ("bilinear", True),
                    "Latent (bicubic)": ("bicubic", False), "Latent (bicubic antialiased)": ("bicubic", True),
                    "Latent (nearest)": ("nearest", False), "Latent (nearest-exact)": ("nearest-exact", False)}
PIXEL_UPSCALERS = {"Lanczos": Image.LANCZOS, "Nearest": Image.NEAREST}
UPSCALERS = (*LATENT_UPSCALERS, *PIXEL_UPSCALERS)
MAX_FIX_STRENGTH = 0.999  # AUTOMATIC1111 stretches the schedule by at most 1 / 0.999


def upscaler_name(name: str) -> str:
    """The AUTOMATIC1111 upscaler `name` stands for (case and spacing do not matter); UsageError listing them."""
    wanted = " ".join(name.split()).lower()
    for known in UPSCALERS:
        if known.lower() == wanted:
            return known
    raise UsageError(f"--hr_upscaler {name!r} is not one this tool has: choose one of {', '.join(UPSCALERS)} "
                     f"(model upscalers such as ESRGAN are not included)")


class HiresFix(AddOn):
    """Two-pass generation: `scale` times the asked size (or `resize_x` x `resize_y`, one of them 0 to keep the
    aspect ratio), `upscaler`, `second_pass_steps` (0: the request's), `denoising_strength`."""

    samples = True

    def __init__(self, scale: float = 2.0, upscaler: str = "Latent", second_pass_steps: int = 0,
                 denoising_strength: float = 0.7, resize_x: int = 0, resize_y: int = 0):
        if not (math.isfinite(scale) and 1.0 <= scale <= 8.0):
            raise UsageError(f"--hr_scale {scale} is outside [1, 8]: the second pass is this many times larger")
        if not 0.0 <= denoising_strength <= 1.0:  # also refuses NaN
            raise UsageError(f"--denoising_strength {denoising_strength} is outside [0, 1]")
        if second_pass_steps < 0 or resize_x < 0 or resize_y < 0:
            raise UsageError("--hr_second_pass_steps, --hr_resize_x and --hr_resize_y must be 0 or more")
        self.scale, self.upscaler = float(scale), upscaler_name(upscaler)
        self.second_pass_steps, self.strength = int(second_pass_steps), float(denoising_strength)
        self.resize = (int(resize_x), int(resize_y))

    def target(self, height: int, width: int, f: int) -> tuple[int, int, int, int]:
        """(height, width) the second pass upscales to, and the latent rows and columns it then crops
        (AUTOMATIC1111's calculate_target_resolution)."""
        resize_x, resize_y = self.resize
        if resize_x == 0 and resize_y == 0:
            return int(height * self.scale), int(width * self.scale), 0, 0
        if resize_y == 0:
            return resize_x * height // width, resize_x, 0, 0
        if resize_x == 0:
            return resize_y, resize_y * width // height, 0, 0
        if width / height < resize_x / resize_y:
            to_height, to_width = resize_x * height // width, resize_x
        else:
            to_height, to_width = resize_y, resize_y * width // height
        return to_height, to_width, (to_height - resize_y) // f, (to_width - resize_x) // f

    def check_model_kind(self, config: Any, ckpt: str) -> None:
        refuse_special_models(config, ckpt)

    def check(self, setup: Setup, requests: Sequence[Request]) -> None:
        check_samplers_start_from_image(requests, "the hires fix's second pass")
        for request in requests:
            height, width, _, _ = self.target(*request.size, 8)
            if height % 64 or width % 64 or max(height, width) > 16384:
                raise UsageError(f"the hires fix makes {width}x{height} images from {request.width}x"
                                 f"{request.height}: pick --hr_scale or --hr_resize_x/_y so that both sides are "
                                 f"multiples of 64 (up to 16384)")

    def sample(self, pipeline: Pipeline, call: SampleCall) -> tuple[torch.Tensor, int] | None:
        if call.warm_up:
            return None
        request, model, f = call.request, pipeline.model, pipeline.defaults["f"]
        first = sample(model, call.sampler, call.steps, pipeline.latent_shape(request), call.cond, call.uncond,
                       request.scale, pipeline.noise(request), eta=call.eta)
        height, width, crop_y, crop_x = self.target(*request.size, f)
        latents = self.upscale(pipeline, first, height, width, request)
        latents = latents[:, :, crop_y // 2:latents.shape[2] - (crop_y + 1) // 2,
                          crop_x // 2:latents.shape[3] - (crop_x + 1) // 2]
        large = request.replace(height=latents.shape[2] * f, width=latents.shape[3] * f)
        cond, uncond = pipeline.conditioning(large)
        steps = self.second_pass_steps or call.steps
        total = int(steps / min(self.strength, MAX_FIX_STRENGTH)) if self.strength > 0 else 0
        strength = min(1.0, (steps + 0.5) / total) if total else 0.0  # int(strength * total) == steps
        made = sample_img2img(model, call.sampler, max(total, 1), latents, strength, cond, uncond, request.scale,
                              pipeline.noise(large), eta=call.eta)
        return made, call.steps + (steps if total else 0)

    def upscale(self, pipeline: Pipeline, latents: torch.Tensor, height: int, width: int,
                request: Request) -> torch.Tensor:
        f, model = pipeline.defaults["f"], pipeline.model
        if self.upscaler in LATENT_UPSCALERS:
            mode, antialias = LATENT_UPSCALERS[self.upscaler]
            return F.interpolate(latents, size=(height // f, width // f), mode=mode, antialias=antialias)
        pixels = to_uint8(model.decode_first_stage(latents.to(next(model.first_stage_model.parameters()).dtype)))
        resized = [np.asarray(Image.fromarray(image).resize((width, height), resample=PIXEL_UPSCALERS[self.upscaler]))
                   for image in pixels]
        images = torch.from_numpy(np.stack(resized).astype(np.float32) / 255.0).permute(0, 3, 1, 2) * 2.0 - 1.0
        return torch.cat([encoded_latents(model, encode_image(model, image[None]), pipeline.noise(request, [seed]))
                          for image, seed in zip(images, request.seeds)])

    def record(self, request: Request, index: int) -> dict[str, Any]:
        resize_x, resize_y = self.resize
        extras = [ExtraField("denoising_strength", self.strength, "Denoising strength", repr(self.strength))]
        if resize_x == 0 and resize_y == 0:
            extras.append(ExtraField("hr_scale", self.scale, "Hires upscale", f"{self.scale:g}"))
        else:
            extras += [ExtraField("hr_resize_x", resize_x, "Hires resize", f"{resize_x}x{resize_y}"),
                       ExtraField("hr_resize_y", resize_y)]
        if self.second_pass_steps:
            extras.append(ExtraField("hr_second_pass_steps", self.second_pass_steps, "Hires steps",
                                     str(self.second_pass_steps)))
        extras.append(ExtraField("hr_upscaler", self.upscaler, "Hires upscaler", self.upscaler))
        return {"extras": extras}
