"""PLMS sampling (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds"), CompVis API.

Each step is a DDIM update (eta = 0) fed with a linear multistep combination of the eps of earlier steps:
Adams-Bashforth of orders 2, 3 and 4 once enough history exists, and a pseudo improved-Euler first step (a trial
DDIM step to the next timestep, then the mean of both eps), at the cost of one extra model call.

v-parameterized models are sampled too: every model output is converted to eps at its own (x, t) before the eps are
combined (diffusers' PNDM instead combines raw v outputs and converts the mixture at the current step).
"""
from __future__ import annotations

from typing import Any

import torch

from ldm.models.diffusion.ddim import DiscreteTimeSampler, StepOptions
from ldm.models.diffusion.noise import ImageNoise


class PLMSSampler(DiscreteTimeSampler):
    """Deterministic PLMS over the same timesteps as `DDIMSampler`; `eta` must be 0."""

    progress_label = "PLMS Sampler"

    def make_schedule(self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.0,
                      verbose: bool = True) -> None:
        if ddim_eta != 0:
            raise ValueError(f"PLMS is deterministic: eta must be 0, got {ddim_eta}; use DDIMSampler for eta > 0")
        super().make_schedule(ddim_num_steps, ddim_discretize, ddim_eta, verbose)

    def _new_run_state(self) -> list[torch.Tensor]:
        return []  # the eps of up to three earlier steps, oldest first

    def _step(self, x: torch.Tensor, cond: Any, t: torch.Tensor, t_next: torch.Tensor, index: int, scale: float,
              options: StepOptions, noise: ImageNoise,
              previous_eps: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        eps, _ = self._model_eps(x, t, cond, scale, options)
        if not previous_eps:
            trial_x0 = self._finish_pred_x0(self._pred_x0_from_eps(x, eps, index), options)
            x_trial = self._ddim_update(x, eps, trial_x0, index, options, noise)
            eps_trial, _ = self._model_eps(x_trial, t_next, cond, scale, options)
            eps_prime = (eps + eps_trial) / 2
        elif len(previous_eps) == 1:
            eps_prime = (3 * eps - previous_eps[-1]) / 2
        elif len(previous_eps) == 2:
            eps_prime = (23 * eps - 16 * previous_eps[-1] + 5 * previous_eps[-2]) / 12
        else:
            eps_prime = (55 * eps - 59 * previous_eps[-1] + 37 * previous_eps[-2] - 9 * previous_eps[-3]) / 24
        previous_eps.append(eps)
        if len(previous_eps) > 3:
            previous_eps.pop(0)
        pred_x0 = self._finish_pred_x0(self._pred_x0_from_eps(x, eps_prime, index), options)
        return self._ddim_update(x, eps_prime, pred_x0, index, options, noise), pred_x0
