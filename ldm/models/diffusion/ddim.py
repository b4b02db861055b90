"""DDIM sampling (Song et al. 2021, "Denoising Diffusion Implicit Models") behind the CompVis `DDIMSampler` API.

`DiscreteTimeSampler` holds what DDIM and PLMS share in CompVis: the subset of DDPM timesteps, the per-step schedule
arrays, the sampling loop with its callbacks, masking and logging, and the DDIM update; subclasses decide which eps
each step feeds that update.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from ldm.models.diffusion.guidance import conditioning_batch_size, guided_model_output
from ldm.models.diffusion.noise import ImageNoise
from ldm.models.diffusion.schedule import NoiseSchedule, make_ddim_timesteps

logger = logging.getLogger(__name__)

PARAMETERIZATIONS = ("eps", "v")


def norm_thresholding(x0: torch.Tensor, value: float) -> torch.Tensor:
    """Scale each image of `x0` down so that its RMS is at most `value` (Stability's `dynamic_threshold`)."""
    rms = x0.pow(2).flatten(1).mean(1).sqrt().clamp(min=value)
    return x0 * (value / rms).reshape(-1, *([1] * (x0.ndim - 1)))


@dataclass
class StepOptions:
    """The per-run knobs of a CompVis `sample` call that every step reads."""

    unconditional_conditioning: Any = None
    quantize_x0: bool = False
    temperature: float = 1.0
    noise_dropout: float = 0.0
    score_corrector: Any = None
    corrector_kwargs: dict | None = None
    dynamic_threshold: float | None = None


class DiscreteTimeSampler:
    """CompVis-style sampler over a subset of the model's DDPM timesteps; see the module docstring."""

    progress_label = "Sampler"

    def __init__(self, model: Any, schedule: str = "linear", device: torch.device | str | None = None, **kwargs: Any):
        # `schedule` and `device` keep CompVis call sites working; the schedule tensors live where the model's buffers
        # are, whatever `device` says
        self.model = model
        self.ddpm_num_timesteps = model.num_timesteps
        self.schedule = schedule
        self.device = device
        self.ddim_timesteps: np.ndarray | None = None

    # --- schedule ---------------------------------------------------------------------------------------------------
    def make_schedule(self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.0,
                      verbose: bool = True) -> None:
        """Pick the timesteps and compute, per step, alpha_t, alpha_prev and sigma_t (float32, on the model device)
        from the model's `NoiseSchedule`."""
        timesteps = make_ddim_timesteps(ddim_discretize, ddim_num_steps, self.ddpm_num_timesteps)
        alphas_cumprod = self.model.alphas_cumprod.detach().float()
        if alphas_cumprod.shape[0] != self.ddpm_num_timesteps:
            raise ValueError(f"model.alphas_cumprod has {alphas_cumprod.shape[0]} entries but model.num_timesteps is "
                             f"{self.ddpm_num_timesteps}; they must agree")
        coefficients = NoiseSchedule(alphas_cumprod).ddim_coefficients(timesteps, ddim_eta)
        self.ddim_timesteps = np.asarray(timesteps)
        self.alphas_cumprod = alphas_cumprod
        self.ddim_alphas = coefficients.alphas
        self.ddim_alphas_prev = coefficients.alphas_prev
        self.ddim_sqrt_one_minus_alphas = coefficients.sqrt_one_minus_alphas
        self.ddim_sigmas = coefficients.sigmas
        self.ddim_eta = float(ddim_eta)
        if verbose:
            logger.info("%s timesteps %s, eta %s", type(self).__name__, timesteps, ddim_eta)

    # --- the public CompVis entry point -----------------------------------------------------------------------------
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
               **kwargs: Any) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        """Run the sampler from x_T (drawn from `noise` when not given) over `S` steps.

        Returns the final latents and `{"x_inter": [...], "pred_x0": [...]}` logged every `log_every_t` steps.
        `noise` supplies x_T and every stochastic draw (eta > 0, masking); without it, seeds come from torch's global
        RNG as CompVis scripts expect. `normals_sequence` is accepted and ignored, as in CompVis.
        """
        self._check_inputs(batch_size, conditioning, unconditional_conditioning, mask, x0, score_corrector,
                           noise, x_T)
        self.make_schedule(ddim_num_steps=S, ddim_eta=eta, verbose=verbose)
        scales = self._guidance_scales(unconditional_guidance_scale, ucg_schedule)
        noise = noise if noise is not None else ImageNoise.from_global_rng(batch_size)
        if x_T is None:
            x_T = noise.randn((batch_size, *shape), device=self.alphas_cumprod.device)
        options = StepOptions(unconditional_conditioning, quantize_x0, temperature, noise_dropout, score_corrector,
                              corrector_kwargs, dynamic_threshold)
        return self._sampling_loop(conditioning, x_T, list(self.ddim_timesteps), scales, options, noise,
                                   mask=mask, x0=x0, callback=callback, img_callback=img_callback,
                                   log_every_t=log_every_t, desc=self.progress_label, verbose=verbose)

    def _check_inputs(self, batch_size: int, conditioning: Any, unconditional_conditioning: Any,
                      mask: torch.Tensor | None, x0: torch.Tensor | None, score_corrector: Any,
                      noise: ImageNoise | None, x_T: torch.Tensor | None) -> None:
        if self.model.parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"model.parameterization {self.model.parameterization!r} is not supported; "
                             f"{type(self).__name__} samples models predicting one of {PARAMETERIZATIONS}")
        for name, cond in (("conditioning", conditioning), ("unconditional_conditioning", unconditional_conditioning)):
            cond_batch = conditioning_batch_size(cond)
            if cond_batch is not None and cond_batch != batch_size:
                raise ValueError(f"{name} has batch size {cond_batch} but batch_size is {batch_size}; "
                                 "give one conditioning per image")
        if mask is not None and x0 is None:
            raise ValueError("a mask needs x0, the latents to keep where mask is 1")
        if score_corrector is not None and self.model.parameterization != "eps":
            raise ValueError("score_corrector modifies eps and needs an eps-parameterized model, "
                             f"not {self.model.parameterization!r}")
        if noise is not None and len(noise) != batch_size:
            raise ValueError(f"noise has {len(noise)} seeds but batch_size is {batch_size}; give one seed per image")
        if x_T is not None and x_T.shape[0] != batch_size:
            raise ValueError(f"x_T has batch size {x_T.shape[0]} but batch_size is {batch_size}")

    def _guidance_scales(self, scale: float, ucg_schedule: Sequence[float] | None) -> list[float]:
        steps = len(self.ddim_timesteps)
        if ucg_schedule is None:
            return [scale] * steps
        if len(ucg_schedule) != steps:
            raise ValueError(f"ucg_schedule has {len(ucg_schedule)} scales but the run has {steps} steps; "
                             "give one guidance scale per step")
        return list(ucg_schedule)

    def _sampling_loop(self, cond: Any, x: torch.Tensor, timesteps: list[int], scales: list[float],
                       options: StepOptions, noise: ImageNoise, mask: torch.Tensor | None = None,
                       x0: torch.Tensor | None = None, callback: Callable[[int], None] | None = None,
                       img_callback: Callable[[torch.Tensor, int], None] | None = None, log_every_t: int = 100,
                       desc: str = "Sampler", verbose: bool = True) -> tuple[torch.Tensor, dict]:
        """Step from the last of `timesteps` down to the first; step i uses schedule entry `len(timesteps) - i - 1`."""
        total = len(timesteps)
        descending = timesteps[::-1]
        intermediates = {"x_inter": [x], "pred_x0": [x]}
        state = self._new_run_state()
        for i, step in enumerate(tqdm(descending, desc=desc, total=total, disable=not verbose)):
            index = total - i - 1
            t = torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)
            t_next = torch.full((x.shape[0],), descending[min(i + 1, total - 1)], device=x.device, dtype=torch.long)
            if mask is not None:
                # keep the known region on the forward process's marginal at this step
                known = (self.ddim_alphas[index].sqrt() * x0
                         + self.ddim_sqrt_one_minus_alphas[index] * noise.randn_like(x0))
                x = known * mask + (1.0 - mask) * x
            x, pred_x0 = self._step(x, cond, t, t_next, index, scales[i], options, noise, state)
            if callback is not None:
                callback(i)
            if img_callback is not None:
                img_callback(pred_x0, i)
            if index % log_every_t == 0 or index == total - 1:
                intermediates["x_inter"].append(x)
                intermediates["pred_x0"].append(pred_x0)
        return x, intermediates

    # --- pieces of a step -------------------------------------------------------------------------------------------
    def _new_run_state(self) -> Any:
        return None

    def _step(self, x: torch.Tensor, cond: Any, t: torch.Tensor, t_next: torch.Tensor, index: int, scale: float,
              options: StepOptions, noise: ImageNoise, state: Any) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _model_eps(self, x: torch.Tensor, t: torch.Tensor, cond: Any, scale: float,
                   options: StepOptions) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps, raw model output) of the guided model at (x, t)."""
        output = guided_model_output(self.model, x, t, cond, options.unconditional_conditioning, scale)
        eps = self.model.predict_eps_from_z_and_v(x, t, output) if self.model.parameterization == "v" else output
        if options.score_corrector is not None:
            eps = options.score_corrector.modify_score(self.model, eps, x, t, cond, **(options.corrector_kwargs or {}))
        return eps, output

    def _pred_x0_from_eps(self, x: torch.Tensor, eps: torch.Tensor, index: int) -> torch.Tensor:
        return (x - self.ddim_sqrt_one_minus_alphas[index] * eps) / self.ddim_alphas[index].sqrt()

    def _finish_pred_x0(self, pred_x0: torch.Tensor, options: StepOptions) -> torch.Tensor:
        if options.quantize_x0:
            pred_x0, *_ = self.model.first_stage_model.quantize(pred_x0)
        if options.dynamic_threshold is not None:
            pred_x0 = norm_thresholding(pred_x0, options.dynamic_threshold)
        return pred_x0

    def _ddim_update(self, x: torch.Tensor, eps: torch.Tensor, pred_x0: torch.Tensor, index: int,
                     options: StepOptions, noise: ImageNoise) -> torch.Tensor:
        """Eq. 12 of the DDIM paper: x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma^2) eps + sigma z."""
        alpha_prev, sigma = self.ddim_alphas_prev[index], self.ddim_sigmas[index]
        x_prev = alpha_prev.sqrt() * pred_x0 + (1.0 - alpha_prev - sigma**2).sqrt() * eps
        if self.ddim_eta > 0:  # a host-side test: eta = 0 draws nothing, so the noise streams stay aligned
            x_prev = x_prev + sigma * self._step_noise(x, options, noise)
        return x_prev

    def _step_noise(self, x: torch.Tensor, options: StepOptions, noise: ImageNoise) -> torch.Tensor:
        z = noise.randn_like(x) * options.temperature
        if options.noise_dropout > 0:
            # dropout whose mask also comes from the per-image streams: P(normal > ndtri(p)) = 1 - p
            keep = noise.randn_like(x) > NormalDist().inv_cdf(options.noise_dropout)
            z = z * keep / (1.0 - options.noise_dropout)
        return z


class DDIMSampler(DiscreteTimeSampler):
    """DDIM over CompVis's timestep subset; eta > 0 adds the DDIM paper's stochasticity (eta = 1 is DDPM-like)."""

    progress_label = "DDIM Sampler"

    def _step(self, x: torch.Tensor, cond: Any, t: torch.Tensor, t_next: torch.Tensor, index: int, scale: float,
              options: StepOptions, noise: ImageNoise, state: Any) -> tuple[torch.Tensor, torch.Tensor]:
        eps, output = self._model_eps(x, t, cond, scale, options)
        if self.model.parameterization == "v":
            pred_x0 = self.model.predict_start_from_z_and_v(x, t, output)
        else:
            pred_x0 = self._pred_x0_from_eps(x, eps, index)
        pred_x0 = self._finish_pred_x0(pred_x0, options)
        return self._ddim_update(x, eps, pred_x0, index, options, noise), pred_x0

    # --- img2img ----------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def stochastic_encode(self, x0: torch.Tensor, t: torch.Tensor, use_original_steps: bool = False,
                          noise: torch.Tensor | ImageNoise | None = None) -> torch.Tensor:
        """Noise clean latents to step `t` (an index into the DDIM steps, or a DDPM timestep with
        `use_original_steps`): sqrt(a) x0 + sqrt(1 - a) noise. Call `make_schedule` first."""
        if use_original_steps:
            alphas = self.model.alphas_cumprod.detach().float()
        else:
            if self.ddim_timesteps is None:
                raise RuntimeError("call make_schedule(ddim_num_steps=...) before stochastic_encode")
            alphas = self.ddim_alphas
        if noise is None:
            noise = ImageNoise.from_global_rng(x0.shape[0])
        if isinstance(noise, ImageNoise):
            noise = noise.randn_like(x0)
        alpha = alphas[t.to(alphas.device).long()].reshape(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
        return alpha.sqrt() * x0 + (1.0 - alpha).sqrt() * noise

    @torch.no_grad()
    def decode(self, x_latent: torch.Tensor, cond: Any, t_start: int, unconditional_guidance_scale: float = 1.0,
               unconditional_conditioning: Any = None, use_original_steps: bool = False,
               callback: Callable[[int], None] | None = None, noise: ImageNoise | None = None,
               verbose: bool = True) -> torch.Tensor:
        """Denoise `x_latent` through DDIM steps `t_start - 1` down to 0, with the eta given to `make_schedule` (its
        noise from `noise`). CompVis img2img pairs it with `stochastic_encode(x0, t_start)`, noised one step above."""
        if use_original_steps:
            raise ValueError("decode(use_original_steps=True) is not supported; make_schedule(ddim_num_steps=1000) "
                             "gives a step at every DDPM timestep")
        if self.ddim_timesteps is None:
            raise RuntimeError("call make_schedule(ddim_num_steps=...) before decode")
        if not 0 < t_start <= len(self.ddim_timesteps):
            raise ValueError(f"t_start must be between 1 and {len(self.ddim_timesteps)} (the scheduled steps), "
                             f"got {t_start}")
        noise = noise if noise is not None else ImageNoise.from_global_rng(x_latent.shape[0])
        options = StepOptions(unconditional_conditioning=unconditional_conditioning)
        timesteps = list(self.ddim_timesteps[:t_start])
        samples, _ = self._sampling_loop(cond, x_latent, timesteps, [unconditional_guidance_scale] * t_start,
                                         options, noise, callback=callback, desc="Decoding image", verbose=verbose)
        return samples
