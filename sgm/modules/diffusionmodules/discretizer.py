"""Noise-level discretizations of generative-models: the SD/SDXL DDPM schedule as sigmas, and Karras et al.'s."""
from __future__ import annotations

import numpy as np
import torch

from ldm.modules.diffusionmodules.util import make_beta_schedule


def generate_roughly_equally_spaced_steps(num_substeps: int, max_step: int) -> np.ndarray:
    """`num_substeps` integer timesteps spread over 0..max_step-1, ascending."""
    return np.linspace(max_step - 1, 0, num_substeps, endpoint=False).astype(int)[::-1]


class Discretization:
    """`n` noise levels, descending when `flip` (as samplers walk them), with a trailing 0 when `do_append_zero`."""

    def __call__(self, n: int, do_append_zero: bool = True, device: torch.device | str = "cpu",
                 flip: bool = False) -> torch.Tensor:
        sigmas = self.get_sigmas(n, device=device)
        if do_append_zero:
            sigmas = torch.cat([sigmas, sigmas.new_zeros([1])])
        return torch.flip(sigmas, (0,)) if flip else sigmas

    def get_sigmas(self, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not implement get_sigmas")


class EDMDiscretization(Discretization):
    """Karras et al. (2022) sigmas, rho-spaced between sigma_max and sigma_min (descending)."""

    def __init__(self, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0):
        self.sigma_min, self.sigma_max, self.rho = sigma_min, sigma_max, rho

    def get_sigmas(self, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
        ramp = torch.linspace(0, 1, n, device=device)
        max_inv_rho, min_inv_rho = self.sigma_max ** (1 / self.rho), self.sigma_min ** (1 / self.rho)
        return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** self.rho


class LegacyDDPMDiscretization(Discretization):
    """The DDPM schedule SD and SDXL were trained on (CompVis "linear": linspace in sqrt(beta), squared), as the
    noise levels sigma_t = sqrt((1 - alphas_cumprod[t]) / alphas_cumprod[t]), descending."""

    def __init__(self, linear_start: float = 0.00085, linear_end: float = 0.0120, num_timesteps: int = 1000):
        self.linear_start, self.linear_end, self.num_timesteps = linear_start, linear_end, num_timesteps
        betas = make_beta_schedule("linear", num_timesteps, linear_start=linear_start, linear_end=linear_end)
        self.alphas_cumprod = np.cumprod(1.0 - betas, axis=0)

    def get_sigmas(self, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
        if not 1 <= n <= self.num_timesteps:
            raise ValueError(f"n={n} noise levels: choose 1..{self.num_timesteps}")
        alphas_cumprod = self.alphas_cumprod
        if n < self.num_timesteps:
            alphas_cumprod = alphas_cumprod[generate_roughly_equally_spaced_steps(n, self.num_timesteps)]
        sigmas = torch.tensor((1 - alphas_cumprod) / alphas_cumprod, dtype=torch.float32, device=device) ** 0.5
        return torch.flip(sigmas, (0,))
