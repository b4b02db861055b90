"""DPM-Solver++ (Lu et al. 2022, arXiv:2211.01095), multistep, order 2, as the CompVis/Stability `DPMSolverSampler`
runs it.

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

from typing import Any, Callable, Sequence

import torch
from tqdm import tqdm

from ldm.models.diffusion.ddim import PARAMETERIZATIONS, norm_thresholding
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
        model = self.model
        if x_T is None:
            noise = noise if noise is not None else ImageNoise.from_global_rng(batch_size)
            x_T = noise.randn((batch_size, *shape), device=model.alphas_cumprod.device)
        x = x_T
        scales = list(ucg_schedule) if ucg_schedule is not None else [unconditional_guidance_scale] * S

        # the whole schedule in float32 on the CPU, once, so no step waits on the device to pick a coefficient
        schedule = NoiseSchedule(model.alphas_cumprod.detach().float().cpu())
        times = schedule.dpm_solver_times(S, skip_type)
        alphas, sigmas, lambdas = schedule.alpha_at(times), schedule.sigma_vp_at(times), schedule.lambda_at(times)
        h = lambdas[1:] - lambdas[:-1]
        # one update is x_next = (sigma_next / sigma) x - alpha_next expm1(-h) D (eq. 9 of the DPM-Solver++ paper,
        # D the x0 prediction or its 2nd-order correction)
        x_coefficients = sigmas[1:] / sigmas[:-1]
        d_coefficients = -alphas[1:] * torch.expm1(-h)
        # D = x0 + (x0 - x0_previous) / (2 r), r = h_previous / h (multistep "midpoint" form); unused at step 0
        history_weights = torch.cat([torch.zeros(1), h[1:] / (2 * h[:-1])])
        on_device = {name: value.to(x.device) for name, value in {
            "model_times": schedule.timestep_at(times), "alphas": alphas, "sigmas": sigmas,
            "x_coefficients": x_coefficients, "d_coefficients": d_coefficients,
            "history_weights": history_weights}.items()}

        intermediates = {"x_inter": [x], "pred_x0": [x]}
        previous_x0 = None
        orders = step_orders(S, order, lower_order_final)
        for i in tqdm(range(S), desc="DPM-Solver++ Sampler", total=S, disable=not verbose):
            t_model = on_device["model_times"][i].expand(x.shape[0])
            output = guided_model_output(model, x, t_model, conditioning, unconditional_conditioning, scales[i])
            alpha, sigma = on_device["alphas"][i], on_device["sigmas"][i]
            pred_x0 = alpha * x - sigma * output if model.parameterization == "v" else (x - sigma * output) / alpha
            if dynamic_threshold is not None:
                pred_x0 = norm_thresholding(pred_x0, dynamic_threshold)
            d = pred_x0 if orders[i] == 1 else pred_x0 + on_device["history_weights"][i] * (pred_x0 - previous_x0)
            x = on_device["x_coefficients"][i] * x + on_device["d_coefficients"][i] * d
            previous_x0 = pred_x0
            if callback is not None:
                callback(i)
            if img_callback is not None:
                img_callback(pred_x0, i)
            index = S - i - 1
            if index % log_every_t == 0 or index == S - 1:
                intermediates["x_inter"].append(x)
                intermediates["pred_x0"].append(pred_x0)
        return x, intermediates

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
