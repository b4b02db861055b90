"""Noise-level (sigma) schedules and the small helpers the k-diffusion samplers share.

Sigmas are in the variance-exploding parameterisation of Karras et al. (2022): x = x0 + sigma * noise, which for a
discrete DDPM schedule means sigma_t = sqrt((1 - alphas_cumprod[t]) / alphas_cumprod[t]).
"""
from __future__ import annotations

import math

import torch


def append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    """`sigmas` with a final 0: the samplers' last step lands on clean data."""
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def append_dims(x: torch.Tensor, ndim: int) -> torch.Tensor:
    """`x` of shape [B] (or any prefix shape) with trailing singleton dims up to `ndim`, to broadcast over images."""
    missing = ndim - x.ndim
    if missing < 0:
        raise ValueError(f"cannot broadcast a tensor of {x.ndim} dims to {ndim} dims")
    return x.reshape(*x.shape, *([1] * missing))


def get_sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0,
                      device: torch.device | str | None = "cpu", dtype: torch.dtype | None = None) -> torch.Tensor:
    """The schedule of Karras et al. (2022), eq. (5): `n` sigmas evenly spaced in sigma^(1/rho), then 0.

    With `dtype` None, k-diffusion's arithmetic to the last bit (a float32 ramp; what AUTOMATIC1111's "Karras"
    gives); with a dtype, the ramp in float64 rounded once to `dtype` (the samplers' `_karras` names use this).
    """
    _check_steps(n)
    min_inv_rho, max_inv_rho = float(sigma_min) ** (1 / rho), float(sigma_max) ** (1 / rho)
    if dtype is None:
        ramp = torch.linspace(0, 1, n)
        return append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho).to(device)
    # float64 so the ramp's rho-th power does not round differently on each device
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return append_zero(sigmas).to(device=device, dtype=dtype)


def get_sigmas_exponential(n: int, sigma_min: float, sigma_max: float, device: torch.device | str | None = "cpu",
                           dtype: torch.dtype | None = None) -> torch.Tensor:
    """`n` sigmas evenly spaced in log sigma from `sigma_max` down to `sigma_min`, then 0.

    With `dtype` None, k-diffusion's float32 arithmetic on `device` (AUTOMATIC1111's "Exponential"); with a dtype,
    computed in float64 and rounded once to `dtype`.
    """
    _check_steps(n)
    log_max, log_min = math.log(float(sigma_max)), math.log(float(sigma_min))
    if dtype is None:
        return append_zero(torch.linspace(log_max, log_min, n, device=device).exp())
    log_sigmas = torch.linspace(log_max, log_min, n, dtype=torch.float64)
    return append_zero(log_sigmas.exp()).to(device=device, dtype=dtype)


def get_sigmas_polyexponential(n: int, sigma_min: float, sigma_max: float, rho: float = 1.0,
                               device: torch.device | str | None = "cpu") -> torch.Tensor:
    """`n` sigmas with log sigma a polynomial of degree `rho` in the ramp 1 -> 0 (rho = 1: exponential), then 0;
    k-diffusion's arithmetic."""
    _check_steps(n)
    log_max, log_min = math.log(float(sigma_max)), math.log(float(sigma_min))
    ramp = torch.linspace(1, 0, n, device=device) ** rho
    return append_zero(torch.exp(ramp * (log_max - log_min) + log_min))


def get_sigmas_vp(n: int, beta_d: float = 19.9, beta_min: float = 0.1, eps_s: float = 1e-3,
                  device: torch.device | str | None = "cpu") -> torch.Tensor:
    """`n` sigmas of the continuous variance-preserving SDE (Song et al. 2021) at times evenly spaced from 1 down to
    `eps_s`, then 0; k-diffusion's arithmetic."""
    _check_steps(n)
    t = torch.linspace(1, eps_s, n, device=device)
    return append_zero(torch.sqrt(torch.exp(beta_d * t**2 / 2 + beta_min * t) - 1))


def _check_steps(n: int) -> None:
    if n < 1:
        raise ValueError(f"a schedule needs at least one step, got n={n}")


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """The probability-flow ODE's derivative dx/dsigma = (x - D(x, sigma)) / sigma (Karras et al. 2022, eq. 3)."""
    return (x - denoised) / append_dims(sigma, x.ndim)


def get_ancestral_step(sigma_from: torch.Tensor, sigma_to: torch.Tensor,
                       eta: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Split an ancestral step sigma_from -> sigma_to into a deterministic step to `sigma_down` plus fresh noise of
    standard deviation `sigma_up`, with sigma_down^2 + sigma_up^2 = sigma_to^2.

    eta = 1 is DDPM's posterior variance, eta = 0 a deterministic (DDIM-like) step.
    """
    sigma_from, sigma_to = torch.as_tensor(sigma_from), torch.as_tensor(sigma_to)
    if not eta:
        return sigma_to, torch.zeros_like(sigma_to)
    posterior_std = (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5
    sigma_up = torch.minimum(sigma_to, eta * posterior_std)
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up
