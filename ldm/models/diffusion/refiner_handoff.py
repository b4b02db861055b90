"""SDXL's "ensemble of expert denoisers": the base model runs the high-noise part of one sigma schedule and the
refiner the rest, on the base's latents as they are (no re-noising), as diffusers does with `denoising_end` on
StableDiffusionXLPipeline followed by `denoising_start` on StableDiffusionXLImg2ImgPipeline.

The split follows diffusers' rule on the schedule's timesteps: cutoff = int(round(T - switch * T)); the base takes
the steps whose timestep is >= cutoff, the refiner those below it. Only the k-diffusion samplers can hand off here:
they integrate one sigma schedule that can be cut anywhere.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from ldm.models.diffusion.k_denoisers import make_denoiser
from ldm.models.diffusion.noise import ImageNoise
from ldm.models.diffusion.samplers import resolve_sampler

# Timesteps recovered from sigmas carry float error (999/9 * 7 comes back as 776.99994): counted as on the cutoff
TIMESTEP_TOLERANCE = 1e-3


def resolves_handoff(name: str) -> bool:
    """Whether sampler `name` can hand off to a refiner mid-schedule (the k-diffusion samplers can)."""
    return resolve_sampler(name).can_hand_off


def handoff_index(timesteps: torch.Tensor, switch: float, num_timesteps: int) -> int:
    """How many of the decreasing step `timesteps` the base runs: those >= diffusers' discrete cutoff for
    `switch` (denoising_end of the base = denoising_start of the refiner)."""
    if not 0.0 < switch < 1.0:  # also refuses NaN
        raise ValueError(f"switch must lie strictly between 0 and 1 (the base's fraction of the run), got {switch}")
    cutoff = int(round(num_timesteps - switch * num_timesteps))
    return int((timesteps >= cutoff - TIMESTEP_TOLERANCE).sum())


def sample_with_refiner(base: Any, refiner: Any, name: str, steps: int, shape: Sequence[int], switch: float,
                        base_conditioning: tuple[Any, Any], refiner_conditioning: tuple[Any, Any], scale: float,
                        noise: ImageNoise, x_T: torch.Tensor | None = None, eta: float | None = None,
                        disable: bool | None = None) -> torch.Tensor:
    """Latents [B, C, H, W] = `shape` from `steps` steps of k-diffusion sampler `name`: the base's schedule, its
    first steps denoised by `base` with `base_conditioning` (cond, uncond), the rest by `refiner` with its own
    `refiner_conditioning`. `x_T` (unit-variance starting noise, drawn from `noise` when None), `eta`, `noise` and
    `scale` as for `ldm.models.diffusion.samplers.sample`; stochastic samplers draw all their noise from `noise`.
    A multistep sampler (dpmpp_2m) restarts its history at the hand-off, as diffusers' second scheduler does."""
    spec = resolve_sampler(name)
    shape = tuple(int(size) for size in shape)
    spec.check_request(steps, shape, noise, eta)
    if not spec.can_hand_off:
        raise ValueError(f"sampler {spec.name!r} cannot hand off to a refiner mid-schedule: use a k-diffusion "
                         f"sampler (euler, euler_a, dpmpp_2m, ...)")
    if base.alphas_cumprod.shape != refiner.alphas_cumprod.shape or not torch.allclose(
            base.alphas_cumprod.float().cpu(), refiner.alphas_cumprod.float().cpu(), rtol=1e-5, atol=1e-7):
        raise ValueError("the refiner's noise schedule differs from the base's: they cannot share one schedule")
    if x_T is None:
        x_T = noise.randn(shape, device=base.device, dtype=torch.float32)
    elif tuple(x_T.shape) != shape:
        raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected {shape}")

    base_denoiser, refiner_denoiser = make_denoiser(base), make_denoiser(refiner)
    sigmas = spec.sigmas(base_denoiser, steps).to(x_T.device)
    timesteps = base_denoiser.schedule.sigma_to_t(sigmas[:-1], quantize=False)  # one per step, decreasing
    split = handoff_index(timesteps, switch, base.num_timesteps)
    x = x_T * sigmas[0]
    noise_sampler = spec.noise_sampler(x, sigmas, noise)  # one Brownian tree over the whole schedule, both halves
    if split > 0:
        x = spec.run(base_denoiser, x, sigmas[:split + 1], *base_conditioning, scale, noise, eta, None, disable,
                     noise_sampler=noise_sampler)
    if split < len(timesteps):
        x = spec.run(refiner_denoiser, x, sigmas[split:], *refiner_conditioning, scale, noise, eta, None, disable,
                     noise_sampler=noise_sampler)
    return x
