"""DPM-Solver++ (Lu et al. 2022, arXiv:2211.01095), multistep, order 2, as the CompVis/Stability `DPMSolverSampler`
runs it: the function `sample_dpm_solver` over a VP-space model and the continuous times of a `NoiseSchedule`, and
the CompVis class on top of it.

Continuous time as in DPM-Solver's discrete-model wrapper: DDPM step n of N sits at t = (n + 1) / N, and
log alpha_t (alpha_t = sqrt(alphas_cumprod)) is piecewise linear in t between those points. The solver integrates
the probability-flow ODE in lambda = log(alpha / sigma) from t = 1 to t = 1 / N (alphas_cumprod[0]) and calls the
model at the fractional DDPM timestep (t - 1/N) * N, e.g. 999 * (1 - i / S) for i = 0..S-1 with uniform times.
That time is `NoiseSchedule`'s continuous-time view (schedule.py), computed in float32 on the CPU.

How it differs from diffusers' `DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2)`: the
update formulas are the same (diffusers' "midpoint" solver type), but diffusers picks integer timesteps (for example
round(linspace(0, 999, S + 1)) with timestep_spacing="linspace") and reads alpha from the discrete alphas_cumprod
there, and by default (final_sigmas_type="zero") ends with a step to sigma = 0 instead of alphas_cumprod[0]. The two
coincide when 999 * i / S is an integer for every i (S = 3, 9, 27, 37, ...) and diffusers uses
timestep_spacing="linspace", final_sigmas_type="sigma_min".
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import trange

from ldm.models.diffusion.ddim import (PARAMETERIZATIONS, Callback, CompVisProgress, DenoisedTransform,
                                       norm_thresholding)
from ldm.models.diffusion.guidance import conditioning_batch_size, guided_model_output
from ldm.models.diffusion.noise import ImageNoise
from ldm.models.diffusion.schedule import SKIP_TYPES, NoiseSchedule


def step_orders(steps: int, order: int, lower_order_final: bool) -> list[int]:
    """The order of each multistep update: the first is first order (no history yet); with `lower_order_final`
    and fewer than 15 steps the last ones drop order too, which steadies very short runs."""
    orders = [min(order, step + 1) for step in range(steps)]
    if lower_order_final and steps < 15:
        orders = [min(o, steps - step) for step, o in enumerate(orders)]
    return orders


@torch.no_grad()
def sample_dpm_solver(model: Callable[..., torch.Tensor], x: torch.Tensor, times: torch.Tensor,
                      schedule: NoiseSchedule, extra_args: dict | None = None, callback: Callback | None = None,
                      disable: bool | None = None, parameterization: str = "eps", order: int = 2,
                      lower_order_final: bool = True,
                      denoised_transform: DenoisedTransform | None = None) -> torch.Tensor:
    """DPM-Solver++ (Lu et al. 2022), multistep, order 1 or 2, in the VP variable: from x_t at continuous time
    `times[0]` down the decreasing `times` of `schedule` (`NoiseSchedule.dpm_solver_times`), one model call a step.

    `model(x, t [B], **extra_args)` returns its raw output at the fractional DDPM timesteps t, eps or v as
    `parameterization` says; the solver turns it into x0 with its own continuous-time alpha and sigma (not the
    model's discrete buffers). `denoised_transform` and `callback` are as for `sample_ddim`.
    """
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {order}")
    if parameterization not in PARAMETERIZATIONS:
        raise ValueError(f"parameterization must be one of {PARAMETERIZATIONS}, got {parameterization!r}")
    if times.ndim != 1 or times.shape[0] < 2:
        raise ValueError(f"times must hold at least two continuous times, got shape {tuple(times.shape)}")
    extra_args = extra_args or {}
    steps = times.shape[0] - 1
    # the whole schedule where `schedule` lives (the CPU, for DPMSolverSampler), once, so no step waits on the
    # device to pick a coefficient
    alphas, sigmas, lambdas = schedule.alpha_at(times), schedule.sigma_vp_at(times), schedule.lambda_at(times)
    h = lambdas[1:] - lambdas[:-1]
    # one update is x_next = (sigma_next / sigma) x - alpha_next expm1(-h) D (eq. 9 of the DPM-Solver++ paper,
    # D the x0 prediction or its 2nd-order correction)
    x_coefficients = sigmas[1:] / sigmas[:-1]
    d_coefficients = -alphas[1:] * torch.expm1(-h)
    # D = x0 + (x0 - x0_previous) / (2 r), r = h_previous / h (multistep "midpoint" form); unused at step 0
    history_weights = torch.cat([torch.zeros(1, device=h.device), h[1:] / (2 * h[:-1])])
    on_device = {name: value.to(x.device) for name, value in {
        "model_times": schedule.timestep_at(times), "alphas": alphas, "sigmas": sigmas,
        "x_coefficients": x_coefficients, "d_coefficients": d_coefficients,
        "history_weights": history_weights}.items()}
    previous_x0 = None
    orders = step_orders(steps, order, lower_order_final)
    for i in trange(steps, disable=disable):
        t_model = on_device["model_times"][i].expand(x.shape[0])
        output = model(x, t_model, **extra_args)
        alpha, sigma = on_device["alphas"][i], on_device["sigmas"][i]
        pred_x0 = alpha * x - sigma * output if parameterization == "v" else (x - sigma * output) / alpha
        if denoised_transform is not None:
            pred_x0 = denoised_transform(pred_x0)
        d = pred_x0 if orders[i] == 1 else pred_x0 + on_device["history_weights"][i] * (pred_x0 - previous_x0)
        x = on_device["x_coefficients"][i] * x + on_device["d_coefficients"][i] * d
        previous_x0 = pred_x0
        if callback is not None:
            callback({"x": x, "i": i, "t": t_model[0], "denoised": pred_x0})
    return x


class DPMSolverSampler:
    """DPM-Solver++(2M) with the CompVis `sample(...)` interface; deterministic, so `eta` must be 0."""

    def __init__(self, model: Any, device: torch.device | str | None = None, **kwargs: Any):
        # `device` keeps CompVis call sites working; the schedule follows the model's buffers
        self.model = model
        self.device = device

    @torch.no_grad()
    def sample(self, S: int, batch_size: int, shape: Sequence[int], conditioning: Any = None,
               callback: Callable[[int], None] | None = None, normals_sequence: Any = None,
               img_callback: Callable[[torch.Tensor, int], None] | None = None, quantize_x0: bool = False,
               eta: float = 0.0, mask: torch.Tensor | None = None, x0: torch.Tensor | None = None,
               temperature: float = 1.0, noise_dropout: float = 0.0, score_corrector: Any = None,
               corrector_kwargs: dict | None = None, verbose: bool = True, x_T: torch.Tensor | None = None,
               log_every_t: int = 100, unconditional_guidance_scale: float = 1.0,
               unconditional_conditioning: Any = None, dynamic_threshold: float | None = None,
               ucg_schedule: Sequence[float] | None = None, noise: ImageNoise | None = None,
               skip_type: str = "time_uniform", order: int = 2, lower_order_final: bool = True,
               **kwargs: Any) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        """Solve from x_T (drawn from `noise` when not given) in `S` steps of `S` model calls.

        Returns the final latents and `{"x_inter": [...], "pred_x0": [...]}` every `log_every_t` steps, like DDIM.
        `temperature` and `noise_dropout` only shape noise, which an ODE solver never draws; they are ignored.
        """
        self._check_inputs(S, batch_size, conditioning, unconditional_conditioning, eta, mask, x0, quantize_x0,
                           score_corrector, ucg_schedule, noise, skip_type, order)
        if x_T is None:
            noise = noise if noise is not None else ImageNoise.from_global_rng(batch_size)
            x_T = noise.randn((batch_size, *shape), device=self.model.alphas_cumprod.device)
        scales = list(ucg_schedule) if ucg_schedule is not None else [unconditional_guidance_scale] * S
        schedule = NoiseSchedule(self.model.alphas_cumprod.detach().float().cpu())
        progress = CompVisProgress(x_T, scales, callback, img_callback, log_every_t)

        def guided_output(x: torch.Tensor, t: torch.Tensor, cond: Any, uncond: Any, cond_scale: float) -> torch.Tensor:
            return guided_model_output(self.model, x, t, cond, uncond, cond_scale)

        transform = None if dynamic_threshold is None else partial(norm_thresholding, value=dynamic_threshold)
        x = sample_dpm_solver(progress.guided(guided_output), x_T, schedule.dpm_solver_times(S, skip_type), schedule,
                              extra_args={"cond": conditioning, "uncond": unconditional_conditioning},
                              callback=progress, disable=not verbose, parameterization=self.model.parameterization,
                              order=order, lower_order_final=lower_order_final, denoised_transform=transform)
        return x, progress.intermediates

    def _check_inputs(self, steps: int, batch_size: int, conditioning: Any, unconditional_conditioning: Any,
                      eta: float, mask: torch.Tensor | None, x0: torch.Tensor | None, quantize_x0: bool,
                      score_corrector: Any, ucg_schedule: Sequence[float] | None, noise: ImageNoise | None,
                      skip_type: str, order: int) -> None:
        if self.model.parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"model.parameterization {self.model.parameterization!r} is not supported; "
                             f"DPMSolverSampler samples models predicting one of {PARAMETERIZATIONS}")
        if steps < 1:
            raise ValueError(f"the number of sampling steps must be at least 1, got {steps}")
        if order not in (1, 2):
            raise ValueError(f"order must be 1 or 2, got {order}")
        if skip_type not in SKIP_TYPES:
            raise ValueError(f"skip_type must be one of {SKIP_TYPES}, got {skip_type!r}")
        if eta != 0:
            raise ValueError(f"DPM-Solver++ is deterministic: eta must be 0, got {eta}; use DDIMSampler for eta > 0")
        unsupported = {"mask": mask, "x0": x0, "score_corrector": score_corrector}
        for name, value in unsupported.items():
            if value is not None:
                raise ValueError(f"{name} is not supported by DPMSolverSampler; use DDIMSampler for it")
        if quantize_x0:
            raise ValueError("quantize_x0 is not supported by DPMSolverSampler; use DDIMSampler for it")
        for name, cond in (("conditioning", conditioning), ("unconditional_conditioning", unconditional_conditioning)):
            cond_batch = conditioning_batch_size(cond)
            if cond_batch is not None and cond_batch != batch_size:
                raise ValueError(f"{name} has batch size {cond_batch} but batch_size is {batch_size}; "
                                 "give one conditioning per image")
        if ucg_schedule is not None and len(ucg_schedule) != steps:
            raise ValueError(f"ucg_schedule has {len(ucg_schedule)} scales but the run has {steps} steps; "
                             "give one guidance scale per step")
        if noise is not None and len(noise) != batch_size:
            raise ValueError(f"noise has {len(noise)} seeds but batch_size is {batch_size}; give one seed per image")
