"""Upscaling with Stability's x4 upscaler (`LatentUpscaleDiffusion`): latents at the low-resolution image's size,
sampled from pure noise beside that image noised to a chosen level, decode to an image 4x larger.

Per image, the random draws come in diffusers' order (StableDiffusionUpscalePipeline) from the image's own stream:
the low-resolution image's augmentation noise, then the starting noise, then whatever the sampler draws.
"""
from __future__ import annotations

from typing import Any

import torch

from ldm.models.diffusion.noise import ImageNoise
from ldm.models.diffusion.samplers import sample


def is_upscaler_model(model: Any) -> bool:
    """Whether `model` takes a low-resolution image and a noise level (a `LatentUpscaleDiffusion`)."""
    return callable(getattr(model, "upscale_conditioning", None))


def sample_upscale(model: Any, name: str, steps: int, low_res: torch.Tensor, noise_level: int, cond: Any,
                   uncond: Any, scale: float, noise: ImageNoise, eta: float | None = None,
                   disable: bool | None = None) -> torch.Tensor:
    """Latents [B, C, h, w] (B = len(noise)) for the low-resolution image `low_res` [1 or B, 3, h, w] in [-1, 1],
    augmented with noise at `noise_level` (0 to the model's max_noise_level), by sampler `name` over `steps` steps
    with classifier-free guidance `scale` between text conditionings `cond` and `uncond` (None: no guidance). Both
    halves see the same augmented image and level, as in Stability's script and diffusers."""
    if not is_upscaler_model(model):
        raise ValueError(f"{type(model).__name__} is not an upscaler: sample_upscale needs a LatentUpscaleDiffusion "
                         "(x4-upscaler-ema with configs/stable-diffusion/x4-upscaling.yaml)")
    batch = len(noise)
    if low_res.ndim != 4 or low_res.shape[0] not in (1, batch) or low_res.shape[1] != 3:
        raise ValueError(f"low_res has shape {tuple(low_res.shape)}: expected [1 or {batch}, 3, h, w]")
    image = low_res.to(device=model.device, dtype=torch.float32).expand(batch, -1, -1, -1)
    level = torch.full((batch,), int(noise_level), dtype=torch.long, device=model.device)
    augmented, level = model.low_scale_model(image, level, noise.randn_like(image))
    cond = model.upscale_conditioning(cond, augmented, level)
    uncond = None if uncond is None else model.upscale_conditioning(uncond, augmented, level)
    shape = (batch, model.channels, *image.shape[2:])
    return sample(model, name, steps, shape, cond, uncond, scale, noise, eta=eta, disable=disable)
