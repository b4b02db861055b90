"""A CompVis `LatentDiffusion` seen as a Karras et al. (2022) denoiser `D(x, sigma) -> x0 estimate`.

The k-diffusion samplers integrate in the variance-exploding variable x = x_t / sqrt(alphas_cumprod[t]), whose noise
level is sigma_t = sqrt((1 - alphas_cumprod[t]) / alphas_cumprod[t]). These wrappers convert both ways: sigma to the
model's timestep, x back to the model's input scale, and the model's eps or v output to a denoised estimate.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ldm.models.diffusion.guidance import concat_conditionings
from ldm.models.diffusion.k_schedules import append_dims, append_zero
from ldm.models.diffusion.schedule import NoiseSchedule


class CompVisDenoiser(nn.Module):
    """An eps-predicting `LatentDiffusion` as a denoiser: D(x, sigma) = x - sigma * eps(x / sqrt(sigma^2 + 1), t).

    Without `quantize` (the default, k-diffusion's and AUTOMATIC1111's) the model sees fractional timesteps between
    the integer ones it was trained on, interpolated in log sigma; with it, only the nearest integer timestep. The
    model's noise levels, and the map between them and its timesteps, are those of its `NoiseSchedule`
    (`schedule`), also reachable here under k-diffusion's names.
    """

    def __init__(self, model: Any, quantize: bool = False):
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
                cond_scale: float = 1.0,
                return_uncond: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Denoised estimate of `x` [B, C, H, W] at noise levels `sigma` [B] under classifier-free guidance, applied
        to the two denoised estimates as k-diffusion front ends (AUTOMATIC1111) apply it: uncond + scale (cond -
        uncond), both halves in one batched call; with `scale == 1` or no `uncond` only the conditional half runs.
        With `return_uncond` (the CFG++ samplers) the pair (guided, unconditional) estimates, both halves run
        whatever the scale (the conditional estimate for both when there is no `uncond`)."""
        c_in = append_dims(self.get_scalings(sigma)[2], x.ndim)
        model_input = x * c_in.to(x.dtype)
        t = self.sigma_to_t(sigma)
        if uncond is None or (cond_scale == 1.0 and not return_uncond):
            denoised = self._denoised(x, self.inner_model.apply_model(model_input, t, cond), sigma)
            return (denoised, denoised) if return_uncond else denoised
        output = self.inner_model.apply_model(torch.cat([model_input, model_input]), torch.cat([t, t]),
                                              concat_conditionings(uncond, cond))  # CompVis order: uncond first
        denoised_uncond, denoised_cond = self._denoised(torch.cat([x, x]), output, torch.cat([sigma, sigma])).chunk(2)
        guided = denoised_uncond + (denoised_cond - denoised_uncond) * cond_scale
        return (guided, denoised_uncond) if return_uncond else guided

    def _denoised(self, x: torch.Tensor, output: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """D = c_skip x + c_out F for the raw model output F."""
        c_skip, c_out, _ = (append_dims(s, x.ndim) for s in self.get_scalings(sigma))
        return x * c_skip.to(x.dtype) + output.to(x.dtype) * c_out.to(x.dtype)


class CompVisVDenoiser(CompVisDenoiser):
    """A v-predicting `LatentDiffusion` (SD 2.x 768-v) as a denoiser, with sigma_data = 1:
    D(x, sigma) = x / (sigma^2 + 1) - sigma / sqrt(sigma^2 + 1) * v(x / sqrt(sigma^2 + 1), t)."""

    def get_scalings(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c_skip = 1 / (sigma**2 + 1)
        c_out = -sigma / (sigma**2 + 1) ** 0.5
        c_in = 1 / (sigma**2 + 1) ** 0.5
        return c_skip, c_out, c_in


class LCMCompVisDenoiser(CompVisDenoiser):
    """An eps-predicting `LatentDiffusion` with LCM weights (an LCM LoRA or checkpoint) as AUTOMATIC1111's LCM sampler
    sees it: the 50 timesteps an LCM was distilled on (every 20th, 19 to 999) are its only noise levels, each sigma
    is served at the nearest of them, and the consistency model's boundary condition (sigma_data 0.5, timestep
    scaled by 10; Luo et al. 2023) turns the denoised estimate into the model's output."""

    original_steps = 50
    sigma_data = 0.5
    timestep_scaling = 10.0

    def __init__(self, model: Any, quantize: bool = True):  # always quantized: `quantize` only fits make_denoiser's call
        if getattr(model, "parameterization", "eps") != "eps":
            raise ValueError("the LCM sampler needs an eps-predicting model (LCM weights for SD 1.x or SDXL); "
                             f"this one predicts {model.parameterization!r}")
        super().__init__(model, quantize=True)
        self.skip = model.alphas_cumprod.shape[0] // self.original_steps
        # timesteps T-1, T-1-skip, ... down to skip-1, ascending
        valid = torch.arange(self.original_steps - 1, -1, -1) * self.skip
        self.lcm_schedule = NoiseSchedule(model.alphas_cumprod[-1 - valid].float())

    @property
    def sigmas(self) -> torch.Tensor:
        return self.lcm_schedule.sigmas

    @property
    def log_sigmas(self) -> torch.Tensor:
        return self.lcm_schedule.log_sigmas

    @property
    def sigma_min(self) -> torch.Tensor:
        return self.lcm_schedule.sigma_min

    @property
    def sigma_max(self) -> torch.Tensor:
        return self.lcm_schedule.sigma_max

    def sigma_to_t(self, sigma: torch.Tensor, quantize: bool | None = None) -> torch.Tensor:
        """The model timestep of the LCM level nearest `sigma` (always an integer timestep)."""
        return self.lcm_schedule.sigma_to_t(sigma, quantize=True) * self.skip + (self.skip - 1)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        index = ((t - (self.skip - 1)) / self.skip).float().clamp(0, self.original_steps - 1)
        return self.lcm_schedule.t_to_sigma(index)

    def get_sigmas(self, n: int | None = None) -> torch.Tensor:
        """`n` noise levels at timesteps evenly spaced from the LCM's highest (T-1) to its lowest (skip-1), then 0."""
        if n is None:
            return append_zero(self.sigmas.flip(0))
        start, end = self.sigma_to_t(self.sigma_max), self.sigma_to_t(self.sigma_min)
        return append_zero(self.t_to_sigma(torch.linspace(start, end, n, device=self.sigmas.device)))

    def _denoised(self, x: torch.Tensor, output: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        scaled_t = append_dims(self.sigma_to_t(sigma), x.ndim).to(x.dtype) * self.timestep_scaling
        boundary_skip = self.sigma_data**2 / (scaled_t**2 + self.sigma_data**2)
        boundary_out = scaled_t / (scaled_t**2 + self.sigma_data**2) ** 0.5
        return boundary_out * super()._denoised(x, output, sigma) + boundary_skip * x


def make_denoiser(model: Any, quantize: bool = False) -> CompVisDenoiser:
    """The denoiser matching `model.parameterization` ("eps" or "v")."""
    parameterization = getattr(model, "parameterization", "eps")
    if parameterization == "eps":
        return CompVisDenoiser(model, quantize=quantize)
    if parameterization == "v":
        return CompVisVDenoiser(model, quantize=quantize)
    raise ValueError(f"model parameterization {parameterization!r} has no k-diffusion denoiser: "
                     "expected 'eps' or 'v'")
