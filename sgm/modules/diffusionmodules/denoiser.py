"""generative-models' denoisers: D(x, sigma) = c_skip x + c_out F(c_in x, c_noise) around a network F.

DiffusionEngine uses the discrete denoiser's discretization and scaling to set up the CompVis schedule and
parameterization that this package's samplers use; calling a denoiser directly gives sgm's own D(x, sigma).
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from ldm.models.diffusion.k_schedules import append_dims
from ldm.util import instantiate_from_config


class Denoiser(nn.Module):
    def __init__(self, scaling_config: Mapping[str, Any]):
        super().__init__()
        self.scaling = instantiate_from_config(scaling_config)

    def possibly_quantize_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma

    def possibly_quantize_c_noise(self, c_noise: torch.Tensor) -> torch.Tensor:
        return c_noise

    def forward(self, network: nn.Module, input: torch.Tensor, sigma: torch.Tensor, cond: Mapping[str, Any],
                **additional_model_inputs: Any) -> torch.Tensor:
        """The denoised estimate of `input` [B, C, H, W] at noise levels `sigma` [B]."""
        sigma = self.possibly_quantize_sigma(sigma)
        c_skip, c_out, c_in, c_noise = self.scaling(append_dims(sigma, input.ndim))
        c_noise = self.possibly_quantize_c_noise(c_noise.reshape(sigma.shape))
        return network(input * c_in, c_noise, cond, **additional_model_inputs) * c_out + input * c_skip


class DiscreteDenoiser(Denoiser):
    """A denoiser for a network trained on `num_idx` discrete timesteps: sigmas snap to the nearest trained level
    and the network is given that level's index as its timestep."""

    def __init__(self, scaling_config: Mapping[str, Any], num_idx: int, discretization_config: Mapping[str, Any],
                 do_append_zero: bool = False, quantize_c_noise: bool = True, flip: bool = True):
        super().__init__(scaling_config)
        self.discretization = instantiate_from_config(discretization_config)
        # recomputed from the config, so checkpoints that carry `denoiser.sigmas` and those that do not both load
        self.register_buffer("sigmas", self.discretization(num_idx, do_append_zero=do_append_zero, flip=flip),
                             persistent=False)
        self.quantize_c_noise = quantize_c_noise
        self.num_idx = num_idx

    def sigma_to_idx(self, sigma: torch.Tensor) -> torch.Tensor:
        distances = sigma - self.sigmas[:, None]  # [num_idx, B]
        return distances.abs().argmin(dim=0).view(sigma.shape)

    def idx_to_sigma(self, idx: torch.Tensor | int) -> torch.Tensor:
        return self.sigmas[idx]

    def possibly_quantize_sigma(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.idx_to_sigma(self.sigma_to_idx(sigma))

    def possibly_quantize_c_noise(self, c_noise: torch.Tensor) -> torch.Tensor:
        return self.sigma_to_idx(c_noise) if self.quantize_c_noise else c_noise
