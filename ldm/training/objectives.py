"""The denoising objective of latent diffusion (Ho et al. 2020; v-prediction: Salimans & Ho 2022)."""
from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F


def drop_captions(captions: Sequence[str], rate: float, generator: torch.Generator) -> list[str]:
    """Each caption replaced by "" with probability `rate`: the unconditional model classifier-free guidance needs
    (Ho & Salimans 2022)."""
    if rate <= 0:
        return list(captions)
    dropped = torch.rand(len(captions), generator=generator) < rate
    return ["" if drop else caption for caption, drop in zip(captions, dropped.tolist())]


def diffusion_target(model: Any, x_start: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """What the UNet learns to predict: the noise (eps), v = sqrt(a) noise - sqrt(1 - a) x0, or x0 itself."""
    if model.parameterization == "eps":
        return noise
    if model.parameterization == "v":
        return model.get_v(x_start, noise, t)
    if model.parameterization == "x0":
        return x_start
    raise ValueError(f"parameterization {model.parameterization!r} cannot be trained: use eps, v or x0")


def min_snr_weight(model: Any, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023): min(SNR, gamma) / SNR expressed for the model's prediction
    target, so that the easy low-noise timesteps stop dominating the gradient."""
    alphas_cumprod = model.alphas_cumprod.to(t.device)[t].float()
    snr = alphas_cumprod / (1.0 - alphas_cumprod)
    clipped = snr.clamp(max=gamma)
    if model.parameterization == "eps":
        return clipped / snr
    if model.parameterization == "v":
        return clipped / (snr + 1.0)
    return clipped  # x0


def diffusion_loss(model: Any, x_start: torch.Tensor, cond: Any, generator: torch.Generator,
                   snr_gamma: float | None = None) -> torch.Tensor:
    """Mean squared error of `model.apply_model` at uniformly drawn timesteps (CompVis `p_losses`, l2, simple),
    optionally Min-SNR weighted.

    `x_start` are scaled latents [B, C, h, w]; timesteps and noise come from the CPU `generator`, so a run is
    reproducible on any device.
    """
    batch = x_start.shape[0]
    t = torch.randint(0, model.num_timesteps, (batch,), generator=generator).to(x_start.device)
    noise = torch.randn(x_start.shape, generator=generator, dtype=torch.float32).to(x_start.device, x_start.dtype)
    x_noisy = model.q_sample(x_start, t, noise)
    prediction = model.apply_model(x_noisy, t, cond)
    target = diffusion_target(model, x_start, noise, t)
    per_item = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(dim=tuple(range(1, x_start.ndim)))
    if snr_gamma is not None:
        per_item = per_item * min_snr_weight(model, t, snr_gamma)
    return per_item.mean()
