"""A CompVis `LatentDiffusion` seen as a Karras et al. (2022) denoiser `D(x, sigma) -> x0 estimate`.

The k-diffusion samplers integrate in the variance-exploding variable x = x_t / sqrt(alphas_cumprod[t]), whose noise
level is sigma_t = sqrt((1 - alphas_cumprod[t]) / alphas_cumprod[t]). These wrappers convert both ways: sigma to the
model's timestep, x back to the model's input scale, and the model's eps or v output to a denoised estimate.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ldm.models.diffusion.guidance import guided_model_output
from ldm.models.diffusion.k_schedules import append_dims
from ldm.models.diffusion.schedule import NoiseSchedule


class CompVisDenoiser(nn.Module):
    """An eps-predicting `LatentDiffusion` as a denoiser: D(x, sigma) = x - sigma * eps(x / sqrt(sigma^2 + 1), t).

    With `quantize` the model only ever sees the integer timesteps it was trained on (the nearest in log sigma);
    without, fractional timesteps in between. The model's noise levels, and the map between them and its
    timesteps, are those of its `NoiseSchedule` (`schedule`), also reachable here under k-diffusion's names.
    """

    def __init__(self, model: Any, quantize: bool = True):
        super().__init__()
        self.schedule = NoiseSchedule(model.alphas_cumprod)
        self.inner_model = model
        self.quantize = quantize

    @property
    def sigmas(self) -> torch.Tensor:
        return self.schedule.sigmas

    @property
    def log_sigmas(self) -> torch.Tensor:
        return self.schedule.log_sigmas

    @property
    def sigma_min(self) -> torch.Tensor:
        return self.schedule.sigma_min

    @property
    def sigma_max(self) -> torch.Tensor:
        return self.schedule.sigma_max

    def sigma_to_t(self, sigma: torch.Tensor, quantize: bool | None = None) -> torch.Tensor:
        """The model timestep of noise level `sigma`: integer when quantizing (default: as the denoiser does)."""
        return self.schedule.sigma_to_t(sigma, self.quantize if quantize is None else quantize)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        return self.schedule.t_to_sigma(t)

    def get_sigmas(self, n: int | None = None) -> torch.Tensor:
        return self.schedule.get_sigmas(n)

    def get_sigmas_discrete(self, n: int) -> torch.Tensor:
        return self.schedule.get_sigmas_discrete(n)

    def get_scalings(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(c_skip, c_out, c_in) with D(x, sigma) = c_skip x + c_out F(c_in x, t) for the raw model output F."""
        c_in = 1 / (sigma**2 + 1) ** 0.5
        return torch.ones_like(sigma), -sigma, c_in

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, cond: Any = None, uncond: Any = None,
                cond_scale: float = 1.0) -> torch.Tensor:
        """Denoised estimate of `x` [B, C, H, W] at noise levels `sigma` [B], under classifier-free guidance."""
        c_skip, c_out, c_in = (append_dims(s, x.ndim) for s in self.get_scalings(sigma))
        model_input = x * c_in.to(x.dtype)
        output = guided_model_output(self.inner_model, model_input, self.sigma_to_t(sigma), cond, uncond, cond_scale)
        return x * c_skip.to(x.dtype) + output.to(x.dtype) * c_out.to(x.dtype)


class CompVisVDenoiser(CompVisDenoiser):
    """A v-predicting `LatentDiffusion` (SD 2.x 768-v) as a denoiser, with sigma_data = 1:
    D(x, sigma) = x / (sigma^2 + 1) - sigma / sqrt(sigma^2 + 1) * v(x / sqrt(sigma^2 + 1), t)."""

    def get_scalings(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c_skip = 1 / (sigma**2 + 1)
        c_out = -sigma / (sigma**2 + 1) ** 0.5
        c_in = 1 / (sigma**2 + 1) ** 0.5
        return c_skip, c_out, c_in


def make_denoiser(model: Any, quantize: bool = True) -> CompVisDenoiser:
    """The denoiser matching `model.parameterization` ("eps" or "v")."""
    parameterization = getattr(model, "parameterization", "eps")
    if parameterization == "eps":
        return CompVisDenoiser(model, quantize=quantize)
    if parameterization == "v":
        return CompVisVDenoiser(model, quantize=quantize)
    raise ValueError(f"model parameterization {parameterization!r} has no k-diffusion denoiser: "
                     "expected 'eps' or 'v'")
