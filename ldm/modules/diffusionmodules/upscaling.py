"""The low-resolution branch of Stability's x4 upscaler: the small image, noised to a chosen level, goes beside the
latents (`LatentUpscaleDiffusion`'s `c_concat`) and the level goes to the UNet's class embedding (`c_adm`)."""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from ldm.models.diffusion.ddpm import extract_into_tensor
from ldm.models.diffusion.noise import ImageNoise
from ldm.modules.diffusionmodules.util import diffusion_schedule, make_beta_schedule


class ImageConcatWithNoiseAugmentation(nn.Module):
    """Noise augmentation of the low-resolution image in pixel space (Saharia et al. 2021, SR3 / Ho et al. 2021,
    cascaded diffusion): x -> sqrt(a_l) x + sqrt(1 - a_l) noise at noise level l of its own schedule.

    `noise_schedule_config` holds `make_beta_schedule`'s arguments (beta_schedule, timesteps, linear_start,
    linear_end, cosine_s); the schedule is kept as buffers under the names the released checkpoint has
    (`low_scale_model.betas`, ...). Levels run from 0 to `max_noise_level` (350 for the released model).
    """

    def __init__(self, noise_schedule_config: Mapping[str, Any], max_noise_level: int = 1000):
        super().__init__()
        settings = {"beta_schedule": "linear", "timesteps": 1000, **dict(noise_schedule_config)}
        betas = make_beta_schedule(settings.pop("beta_schedule"), settings.pop("timesteps"), **settings)
        for name, value in diffusion_schedule(betas).items():
            self.register_buffer(name, torch.tensor(value, dtype=torch.float32))
        self.num_timesteps = int(betas.shape[0])
        if not 0 <= max_noise_level <= self.num_timesteps:
            raise ValueError(f"max_noise_level {max_noise_level} must lie in [0, {self.num_timesteps}], the "
                             "noise schedule's timesteps")
        self.max_noise_level = int(max_noise_level)

    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) noise, in x_start's dtype."""
        return (extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start) * x_start
                + extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise)

    def forward(self, x: torch.Tensor, noise_level: torch.Tensor,
                noise: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(images [B, 3, h, w] in [-1, 1] noised to `noise_level` [B] (integers), those levels as long).

        `noise` is unit noise shaped like `x`; without it each image draws from a seed taken from torch's global
        RNG, for CompVis-style callers that seed globally.
        """
        if noise_level is None or not torch.is_tensor(noise_level):
            raise TypeError("noise_level must be a tensor of integer levels, one per image (e.g. torch.full((B,), "
                            f"20)); training-time random levels are not supported; got {noise_level!r}")
        noise_level = noise_level.to(device=x.device, dtype=torch.long)
        if noise_level.min() < 0 or noise_level.max() > self.max_noise_level:
            raise ValueError(f"noise levels {noise_level.tolist()} must lie in [0, {self.max_noise_level}]")
        if noise is None:
            noise = ImageNoise.from_global_rng(x.shape[0]).randn_like(x)
        return self.q_sample(x, noise_level, noise.to(x)), noise_level
