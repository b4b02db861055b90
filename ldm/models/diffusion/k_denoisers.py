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
from ldm.models.diffusion.k_schedules import append_dims, append_zero


class DiscreteSchedule(nn.Module):
    """The map between continuous noise levels and the discrete timesteps 0..T-1 a DDPM model was trained on."""

    def __init__(self, sigmas: torch.Tensor, quantize: bool):
        super().__init__()
        if sigmas.ndim != 1 or sigmas.numel() < 2 or not bool((sigmas[1:] > sigmas[:-1]).all()):
            raise ValueError("a discrete schedule needs at least two sigmas, strictly increasing with t")
        self.register_buffer("sigmas", sigmas, persistent=False)
        self.register_buffer("log_sigmas", sigmas.log(), persistent=False)
        self.quantize = quantize

    @property
    def sigma_min(self) -> torch.Tensor:
        return self.sigmas[0]

    @property
    def sigma_max(self) -> torch.Tensor:
        return self.sigmas[-1]

    def sigma_to_t(self, sigma: torch.Tensor, quantize: bool | None = None) -> torch.Tensor:
        """The timestep of noise level `sigma`: the nearest in log sigma when quantizing (an integer tensor), else
        the fractional timestep found by interpolating log sigma linearly between neighbouring timesteps."""
        quantize = self.quantize if quantize is None else quantize
        log_sigma = sigma.to(self.log_sigmas.dtype).log().reshape(-1)
        if quantize:
            distances = (log_sigma[None, :] - self.log_sigmas[:, None]).abs()  # [T, N]
            return distances.argmin(dim=0).reshape(sigma.shape)
        last = self.log_sigmas.numel() - 1
        low = (torch.searchsorted(self.log_sigmas, log_sigma, right=True) - 1).clamp(0, last - 1)
        low_log, high_log = self.log_sigmas[low], self.log_sigmas[low + 1]
        weight = ((log_sigma - low_log) / (high_log - low_log)).clamp(0, 1)
        return (low + weight).reshape(sigma.shape)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """The noise level of a (possibly fractional) timestep, interpolating log sigma linearly."""
        t = t.to(self.log_sigmas.dtype)
        low = t.floor().long().clamp(0, self.log_sigmas.numel() - 1)
        high = t.ceil().long().clamp(0, self.log_sigmas.numel() - 1)
        return torch.lerp(self.log_sigmas[low], self.log_sigmas[high], t - low).exp()

    def get_sigmas(self, n: int | None = None) -> torch.Tensor:
        """The model's own schedule as k-diffusion builds it: `n` timesteps evenly spaced from T-1 down to 0 (noise
        levels interpolated in log sigma between integer timesteps), then sigma 0. All T levels when n is None."""
        if n is None:
            return append_zero(self.sigmas.flip(0))
        if n < 1:
            raise ValueError(f"a schedule needs at least one step, got n={n}")
        t = torch.linspace(self.sigmas.numel() - 1, 0, n, device=self.sigmas.device, dtype=self.sigmas.dtype)
        return append_zero(self.t_to_sigma(t))

    def get_sigmas_discrete(self, n: int) -> torch.Tensor:
        """`n` integer timesteps round(k (T-1) / n) for k = n..1, then sigma 0: the spacing diffusers' multistep
        schedulers call "linspace" (it stops short of t=0 and leaves the last step to sigma 0)."""
        if n < 1:
            raise ValueError(f"a schedule needs at least one step, got n={n}")
        last = self.sigmas.numel() - 1
        # Python's round() rounds halves to even, as numpy does in diffusers
        timesteps = torch.tensor([round(k * last / n) for k in range(n, 0, -1)], device=self.sigmas.device)
        return append_zero(self.sigmas[timesteps])


def _schedule_sigmas(model: Any) -> torch.Tensor:
    alphas_cumprod = model.alphas_cumprod
    return ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5


class CompVisDenoiser(DiscreteSchedule):
    """An eps-predicting `LatentDiffusion` as a denoiser: D(x, sigma) = x - sigma * eps(x / sqrt(sigma^2 + 1), t).

    With `quantize` the model only ever sees the integer timesteps it was trained on (the nearest in log sigma);
    without, fractional timesteps in between.
    """

    def __init__(self, model: Any, quantize: bool = True):
        super().__init__(_schedule_sigmas(model), quantize)
        self.inner_model = model

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
