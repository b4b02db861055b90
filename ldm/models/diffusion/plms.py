"""PLMS sampling (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds") as a function over a
VP-space eps model, and the CompVis `PLMSSampler` API on top of it.

Each step is a DDIM update (eta = 0) fed with a linear multistep combination of the eps of earlier steps:
Adams-Bashforth of orders 2, 3 and 4 once enough history exists, and a pseudo improved-Euler first step (a trial
DDIM step to the next timestep, then the mean of both eps), at the cost of one extra model call. `sample_plms` takes
the arguments of `sample_ddim` (see ddim.py) without the noise knobs: it draws noise only for a mask.

v-parameterized models are sampled too: every model output is converted to eps at its own (x, t) before the eps are
combined (diffusers' PNDM instead combines raw v outputs and converts the mixture at the current step).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from tqdm.auto import trange

from ldm.models.diffusion.ddim import (Callback, DenoisedTransform, DiscreteTimeSampler, EpsModel, RandnLike,
                                       check_step_sequence, ddim_step, keep_known, pred_x0_from_eps,
                                       require_randn_like)
from ldm.models.diffusion.schedule import ddim_coefficients


def multistep_eps(eps: torch.Tensor, previous_eps: list[torch.Tensor]) -> torch.Tensor:
    """The Adams-Bashforth combination of `eps` with the eps of the up to three steps before it (oldest first)."""
    if len(previous_eps) == 1:
        return (3 * eps - previous_eps[-1]) / 2
    if len(previous_eps) == 2:
        return (23 * eps - 16 * previous_eps[-1] + 5 * previous_eps[-2]) / 12
    return (55 * eps - 59 * previous_eps[-1] + 37 * previous_eps[-2] - 9 * previous_eps[-3]) / 24


@torch.no_grad()
def sample_plms(model: EpsModel, x: torch.Tensor, timesteps: Sequence[int], alphas: torch.Tensor,
                extra_args: dict | None = None, callback: Callback | None = None, disable: bool | None = None,
                randn_like: RandnLike | None = None, denoised_transform: DenoisedTransform | None = None,
                mask: torch.Tensor | None = None, x0: torch.Tensor | None = None) -> torch.Tensor:
    """PLMS (Liu et al. 2022) down the descending `timesteps`, deterministic; the estimate each step reports is the
    one of the combined eps."""
    check_step_sequence(timesteps, alphas)
    extra_args = extra_args or {}
    coefficients = ddim_coefficients(alphas[:-1], alphas[1:], 0.0)
    if mask is not None:
        randn_like = require_randn_like(randn_like, "sample_plms")
    previous_eps: list[torch.Tensor] = []  # the eps of up to three earlier steps, oldest first
    finish = denoised_transform or (lambda denoised: denoised)
    for i in trange(len(timesteps), disable=disable):
        alpha, sqrt_one_minus_alpha = coefficients.alphas[i], coefficients.sqrt_one_minus_alphas[i]
        alpha_next, sigma = coefficients.alphas_prev[i], coefficients.sigmas[i]
        if mask is not None:
            x = keep_known(x, x0, mask, alpha, sqrt_one_minus_alpha, randn_like)
        t = torch.full((x.shape[0],), timesteps[i], device=x.device, dtype=torch.long)
        eps, _ = model(x, t, **extra_args)
        if not previous_eps:
            t_next = torch.full((x.shape[0],), timesteps[min(i + 1, len(timesteps) - 1)], device=x.device,
                                dtype=torch.long)
            x_trial = ddim_step(eps, finish(pred_x0_from_eps(x, eps, alpha, sqrt_one_minus_alpha)), alpha_next, sigma)
            eps_trial, _ = model(x_trial, t_next, **extra_args)
            eps_prime = (eps + eps_trial) / 2
        else:
            eps_prime = multistep_eps(eps, previous_eps)
        previous_eps = (previous_eps + [eps])[-3:]
        denoised = finish(pred_x0_from_eps(x, eps_prime, alpha, sqrt_one_minus_alpha))
        x = ddim_step(eps_prime, denoised, alpha_next, sigma)
        if callback is not None:
            callback({"x": x, "i": i, "t": timesteps[i], "denoised": denoised})
    return x


class PLMSSampler(DiscreteTimeSampler):
    """Deterministic PLMS over the same timesteps as `DDIMSampler`; `eta` must be 0."""

    sampler_function = staticmethod(sample_plms)

    def make_schedule(self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.0,
                      verbose: bool = True) -> None:
        if ddim_eta != 0:
            raise ValueError(f"PLMS is deterministic: eta must be 0, got {ddim_eta}; use DDIMSampler for eta > 0")
        super().make_schedule(ddim_num_steps, ddim_discretize, ddim_eta, verbose)

    def _function_knobs(self, knobs: dict[str, Any]) -> dict[str, Any]:
        # temperature and noise_dropout only shape eta's noise, which PLMS never draws
        return {key: value for key, value in knobs.items() if key not in ("temperature", "noise_dropout")}
