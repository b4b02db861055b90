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
                      device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The schedule of Karras et al. (2022), eq. (5): `n` sigmas evenly spaced in sigma^(1/rho), then 0."""
    if n < 1:
        raise ValueError(f"a schedule needs at least one step, got n={n}")
    # float64 so the ramp's rho-th power does not round differently on each device
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    min_inv_rho, max_inv_rho = float(sigma_min) ** (1 / rho), float(sigma_max) ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return append_zero(sigmas).to(device=device, dtype=dtype)


def get_sigmas_exponential(n: int, sigma_min: float, sigma_max: float, device: torch.device | str | None = None,
                           dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`n` sigmas evenly spaced in log sigma from `sigma_max` down to `sigma_min`, then 0."""
    if n < 1:
        raise ValueError(f"a schedule needs at least one step, got n={n}")
    log_sigmas = torch.linspace(math.log(float(sigma_max)), math.log(float(sigma_min)), n, dtype=torch.float64)
    return append_zero(log_sigmas.exp()).to(device=device, dtype=dtype)


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
