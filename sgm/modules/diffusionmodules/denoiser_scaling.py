"""Preconditionings (c_skip, c_out, c_in, c_noise) of Karras et al. (2022) for the network parameterizations of
generative-models. `parameterization` names the CompVis equivalent, where there is one."""
from __future__ import annotations

import torch

Scalings = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]


class EpsScaling:
    """The network predicts the noise (SD 1.x, SDXL base and refiner)."""

    parameterization = "eps"

    def __call__(self, sigma: torch.Tensor) -> Scalings:
        return torch.ones_like(sigma), -sigma, 1 / (sigma**2 + 1.0) ** 0.5, sigma.clone()


class VScaling:
    """The network predicts v (Salimans & Ho 2022; SD 2.x 768-v)."""

    parameterization = "v"

    def __call__(self, sigma: torch.Tensor) -> Scalings:
        c_in = 1 / (sigma**2 + 1.0) ** 0.5
        return 1 / (sigma**2 + 1.0), -sigma * c_in, c_in, sigma.clone()


class VScalingWithEDMcNoise(VScaling):
    """v prediction with the network fed 0.25 log(sigma) instead of a timestep (continuous-time models)."""

    parameterization = None

    def __call__(self, sigma: torch.Tensor) -> Scalings:
        c_skip, c_out, c_in, _ = super().__call__(sigma)
        return c_skip, c_out, c_in, 0.25 * sigma.log()


class EDMScaling:
    """Karras et al.'s own preconditioning with data standard deviation `sigma_data`."""

    parameterization = None

    def __init__(self, sigma_data: float = 0.5):
        self.sigma_data = sigma_data

    def __call__(self, sigma: torch.Tensor) -> Scalings:
        total = sigma**2 + self.sigma_data**2
        return self.sigma_data**2 / total, sigma * self.sigma_data / total**0.5, 1 / total**0.5, 0.25 * sigma.log()
