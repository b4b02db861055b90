"""Small building blocks shared by the diffusion UNet: timestep embeddings, normalization, layer factories, schedules.

Behaviour follows CompVis `ldm/modules/diffusionmodules/util.py` (itself from OpenAI's guided-diffusion), so that
released checkpoints reproduce their outputs.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(
    timesteps: torch.Tensor, dim: int, max_period: float = 10000, repeat_only: bool = False
) -> torch.Tensor:
    """Sinusoidal embeddings [N, dim] of N (possibly fractional) timesteps, cosines first then sines, in float32."""
    if repeat_only:
        return timesteps[:, None].expand(timesteps.shape[0], dim)
    half = dim // 2
    frequencies = torch.exp(
        -math.log(max_period) * torch.arange(0, half, dtype=torch.float32, device=timesteps.device) / half
    )
    angles = timesteps[:, None].float() * frequencies[None]  # [N, half]
    embedding = torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def guidance_scale_embedding(w: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embeddings [N, dim] of N guidance weights w, as latent consistency models take them (Luo et al.
    2023, their UNet's `time_cond_proj` input): of 1000 w, sines first then cosines, frequencies
    10000^(-k / (dim / 2 - 1)), in float32."""
    half = dim // 2
    frequencies = torch.exp(-math.log(10000.0) / (half - 1) * torch.arange(half, dtype=torch.float32,
                                                                          device=w.device))
    angles = (w.float() * 1000.0)[:, None] * frequencies[None]  # [N, half]
    embedding = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter of `module` in place and return it (residual branches start as the identity)."""
    for parameter in module.parameters():
        parameter.detach().zero_()
    return module


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and cast back: fp16 variance over large groups loses too much precision."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = None if self.weight is None else self.weight.float()
        bias = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, weight, bias, self.eps).to(x.dtype)


def normalization(channels: int, eps: float = 1e-5) -> GroupNorm32:
    """The UNet's standard normalization: 32-group GroupNorm in float32."""
    if channels % 32:
        raise ValueError(f"GroupNorm with 32 groups needs channels divisible by 32, got {channels}; "
                         "choose model_channels (and channel_mult) so every level has a multiple of 32 channels")
    return GroupNorm32(32, channels, eps=eps)


def conv_nd(dims: int, *args, **kwargs) -> nn.Module:
    """A 1D, 2D or 3D convolution."""
    convolutions = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
    if dims not in convolutions:
        raise ValueError(f"dims must be 1, 2 or 3, got {dims!r}")
    return convolutions[dims](*args, **kwargs)


def avg_pool_nd(dims: int, *args, **kwargs) -> nn.Module:
    """A 1D, 2D or 3D average pooling."""
    pools = {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}
    if dims not in pools:
        raise ValueError(f"dims must be 1, 2 or 3, got {dims!r}")
    return pools[dims](*args, **kwargs)


def linear(*args, **kwargs) -> nn.Linear:
    """A linear layer (kept as a factory for symmetry with `conv_nd`)."""
    return nn.Linear(*args, **kwargs)


def make_beta_schedule(
    schedule: str,
    n_timestep: int,
    linear_start: float = 1e-4,
    linear_end: float = 2e-2,
    cosine_s: float = 8e-3,
) -> np.ndarray:
    """Noise variances beta_1..beta_T as a float64 array.

    "linear" is CompVis' name for the scaled-linear schedule (linear in sqrt(beta)) that Stable Diffusion uses;
    "cosine" is Nichol & Dhariwal 2021; "sqrt_linear" is linear in beta; "sqrt" is the square root of that.
    Computed with torch in float64 exactly as CompVis does, so the values match bit for bit.
    """
    if schedule == "linear":
        betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, n_timestep, dtype=torch.float64) ** 2
    elif schedule == "cosine":
        steps = torch.arange(n_timestep + 1, dtype=torch.float64) / n_timestep + cosine_s
        alphas_cumprod = torch.cos(steps / (1 + cosine_s) * math.pi / 2).pow(2)
        alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
        betas = (1 - alphas_cumprod[1:] / alphas_cumprod[:-1]).clamp(0, 0.999)
    elif schedule == "sqrt_linear":
        betas = torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64)
    elif schedule == "sqrt":
        betas = torch.linspace(linear_start, linear_end, n_timestep, dtype=torch.float64) ** 0.5
    else:
        raise ValueError(f"unknown beta schedule {schedule!r}; use 'linear', 'cosine', 'sqrt_linear' or 'sqrt'")
    return betas.numpy()


def diffusion_schedule(betas: np.ndarray) -> dict[str, np.ndarray]:
    """The forward-process buffers of CompVis (and of Stability's low-resolution noise model), in float64 from
    betas, under their checkpoint names."""
    alphas_cumprod = np.cumprod(1.0 - betas)
    return {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": np.append(1.0, alphas_cumprod[:-1]),
        "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
        "log_one_minus_alphas_cumprod": np.log(1.0 - alphas_cumprod),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1),
    }
