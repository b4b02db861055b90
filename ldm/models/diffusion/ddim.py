"""DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models") as a function over a VP-space eps model, and the
CompVis `DDIMSampler` API on top of it.

`sample_ddim(model, x, timesteps, alphas, extra_args, callback, disable, **knobs)` is shaped like the k-diffusion
samplers, in the variance-preserving variable CompVis samples in: `x` is x_t at the first of the descending integer
`timesteps`, and step i goes from alphas_cumprod `alphas[i]` (that of `timesteps[i]`) to `alphas[i + 1]` (the last is
alphas_cumprod[0], not 1, as in CompVis). `model(x, t [B], **extra_args)` returns `(eps, denoised)`: the noise
prediction and, where the model's parameterization gives one directly (v), its own clean estimate; None means "derive
it from eps" (x0 = (x - sqrt(1 - a) eps) / sqrt(a)). Randomness comes only from `randn_like(x)`.

`DiscreteTimeSampler` holds what DDIM and PLMS share in CompVis: the subset of DDPM timesteps and the per-step schedule
arrays (from `NoiseSchedule`), the model adapter `GuidedEpsModel`, argument checks, callbacks and the logged
intermediates; subclasses name the function that runs the steps.
"""
from __future__ import annotations

import logging
from statistics import NormalDist
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm.auto import trange

from ldm.models.diffusion.guidance import conditioning_batch_size, guided_model_output
from ldm.models.diffusion.noise import ImageNoise
from ldm.models.diffusion.schedule import NoiseSchedule, ddim_coefficients, make_ddim_timesteps

logger = logging.getLogger(__name__)

PARAMETERIZATIONS = ("eps", "v")

EpsModel = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]
RandnLike = Callable[[torch.Tensor], torch.Tensor]
Callback = Callable[[dict[str, Any]], None]
DenoisedTransform = Callable[[torch.Tensor], torch.Tensor]


def norm_thresholding(x0: torch.Tensor, value: float) -> torch.Tensor:
    """Scale each image of `x0` down so that its RMS is at most `value` (Stability's `dynamic_threshold`)."""
    rms = x0.pow(2).flatten(1).mean(1).sqrt().clamp(min=value)
    return x0 * (value / rms).reshape(-1, *([1] * (x0.ndim - 1)))


# --- the pieces of a step, shared with PLMS (all coefficients are 0-d tensors of one step) ---------------------------
def check_step_sequence(timesteps: Sequence[int], alphas: torch.Tensor) -> None:
    """ValueError unless there is one alphas_cumprod per timestep plus the one the last step goes to."""
    if len(timesteps) < 1 or alphas.ndim != 1 or alphas.shape[0] != len(timesteps) + 1:
        raise ValueError(f"{len(timesteps)} timesteps need {len(timesteps) + 1} alphas (one per step plus the one "
                         f"the last step goes to), got shape {tuple(alphas.shape)}")


def pred_x0_from_eps(x: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor,
                     sqrt_one_minus_alpha: torch.Tensor) -> torch.Tensor:
    """x0 = (x - sqrt(1 - a) eps) / sqrt(a)."""
    return (x - sqrt_one_minus_alpha * eps) / alpha.sqrt()


def ddim_step(eps: torch.Tensor, pred_x0: torch.Tensor, alpha_next: torch.Tensor,
              sigma: torch.Tensor) -> torch.Tensor:
    """Eq. 12 of the DDIM paper without its noise term: sqrt(a_next) x0 + sqrt(1 - a_next - sigma^2) eps."""
    return alpha_next.sqrt() * pred_x0 + (1.0 - alpha_next - sigma**2).sqrt() * eps


def keep_known(x: torch.Tensor, x0: torch.Tensor, mask: torch.Tensor, alpha: torch.Tensor,
               sqrt_one_minus_alpha: torch.Tensor, randn_like: RandnLike) -> torch.Tensor:
    """`x` with the known latents `x0` noised to the forward process's marginal at alpha where `mask` is 1."""
    known = alpha.sqrt() * x0 + sqrt_one_minus_alpha * randn_like(x0)
    return known * mask + (1.0 - mask) * x


def step_noise(x: torch.Tensor, randn_like: RandnLike, temperature: float, noise_dropout: float) -> torch.Tensor:
    """Unit noise like `x` times `temperature`, with a fraction `noise_dropout` of it dropped (CompVis' knobs)."""
    z = randn_like(x) * temperature
    if noise_dropout > 0:
        # dropout whose mask also comes from the noise source: P(normal > ndtri(p)) = 1 - p
        keep = randn_like(x) > NormalDist().inv_cdf(noise_dropout)
        z = z * keep / (1.0 - noise_dropout)
    return z


def require_randn_like(randn_like: RandnLike | None, sampler: str) -> RandnLike:
    if randn_like is None:
        raise ValueError(f"{sampler} draws noise (eta > 0 or a mask) but was given no randn_like: pass "
                         "randn_like=ImageNoise(seeds).randn_like")
    return randn_like


@torch.no_grad()
def sample_ddim(model: EpsModel, x: torch.Tensor, timesteps: Sequence[int], alphas: torch.Tensor,
                extra_args: dict | None = None, callback: Callback | None = None, disable: bool | None = None,
                eta: float = 0.0, randn_like: RandnLike | None = None, temperature: float = 1.0,
                noise_dropout: float = 0.0, denoised_transform: DenoisedTransform | None = None,
                mask: torch.Tensor | None = None, x0: torch.Tensor | None = None) -> torch.Tensor:
    """DDIM (Song et al. 2021, eq. 12) down the descending `timesteps`; eta = 0 is deterministic, eta = 1 has DDPM's
    posterior variance (eq. 16).

    `denoised_transform` is applied to every clean estimate before it is used (CompVis' quantize_x0 and
    dynamic_threshold). Where `mask` is 1, each step first resets x to the known latents `x0` noised to that step's
    marginal (CompVis' masked sampling). `callback` receives {"x", "i", "t", "denoised"} after each step, "x" being
    the latents it made.
    """
    check_step_sequence(timesteps, alphas)
    extra_args = extra_args or {}
    coefficients = ddim_coefficients(alphas[:-1], alphas[1:], eta)
    if eta > 0 or mask is not None:
        randn_like = require_randn_like(randn_like, "sample_ddim")
    for i in trange(len(timesteps), disable=disable):
        alpha, sqrt_one_minus_alpha = coefficients.alphas[i], coefficients.sqrt_one_minus_alphas[i]
        if mask is not None:
            x = keep_known(x, x0, mask, alpha, sqrt_one_minus_alpha, randn_like)
        t = torch.full((x.shape[0],), timesteps[i], device=x.device, dtype=torch.long)
        eps, denoised = model(x, t, **extra_args)
        if denoised is None:
            denoised = pred_x0_from_eps(x, eps, alpha, sqrt_one_minus_alpha)
        if denoised_transform is not None:
            denoised = denoised_transform(denoised)
        x_next = ddim_step(eps, denoised, coefficients.alphas_prev[i], coefficients.sigmas[i])
        if eta > 0:  # a host-side test: eta = 0 draws nothing, so the noise streams stay aligned
            x_next = x_next + coefficients.sigmas[i] * step_noise(x, randn_like, temperature, noise_dropout)
        x = x_next
        if callback is not None:
            callback({"x": x, "i": i, "t": timesteps[i], "denoised": denoised})
    return x


class GuidedEpsModel:
    """A CompVis model (`apply_model`, `parameterization`) as the `EpsModel` of `sample_ddim` and `sample_plms`, under
    classifier-free guidance: `model(x, t, cond=..., uncond=..., cond_scale=...) -> (eps, denoised)`.

    v-models convert with the model's own schedule buffers (`predict_eps_from_z_and_v`, `predict_start_from_z_and_v`),
    as CompVis does; eps models return denoised None. A CompVis `score_corrector` modifies eps.
    """

    def __init__(self, model: Any, score_corrector: Any = None, corrector_kwargs: dict | None = None):
        self.model = model
        self.score_corrector = score_corrector
        self.corrector_kwargs = corrector_kwargs or {}

    def __call__(self, x: torch.Tensor, t: torch.Tensor, cond: Any = None, uncond: Any = None,
                 cond_scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
        output = guided_model_output(self.model, x, t, cond, uncond, cond_scale)
        denoised = None
        eps = output
        if self.model.parameterization == "v":
            eps = self.model.predict_eps_from_z_and_v(x, t, output)
            denoised = self.model.predict_start_from_z_and_v(x, t, output)
        if self.score_corrector is not None:
            eps = self.score_corrector.modify_score(self.model, eps, x, t, cond, **self.corrector_kwargs)
        return eps, denoised


class CompVisProgress:
    """The CompVis side of a run of a step function: each step's guidance scale (`scales`, CompVis' ucg_schedule),
    `callback(i)` and `img_callback(pred_x0, i)` after each step, and `intermediates`, {"x_inter": [...],
    "pred_x0": [...]} logged every `log_every_t` steps counted from the end, and after the first."""

    def __init__(self, x_T: torch.Tensor, scales: list[float], callback: Callable[[int], None] | None = None,
                 img_callback: Callable[[torch.Tensor, int], None] | None = None, log_every_t: int = 100):
        self.scales, self.callback, self.img_callback, self.log_every_t = scales, callback, img_callback, log_every_t
        self.intermediates = {"x_inter": [x_T], "pred_x0": [x_T]}
        self.step = 0

    def guided(self, model: Callable[..., Any]) -> Callable[..., Any]:
        """`model` called with the guidance scale of the step the run is at."""
        def at_step_scale(x: torch.Tensor, t: torch.Tensor, **extra: Any) -> Any:
            return model(x, t, cond_scale=self.scales[self.step], **extra)
        return at_step_scale

    def __call__(self, info: dict[str, Any]) -> None:
        """The step functions' callback: {"x": the step's result, "i", "denoised"}."""
        i, steps = info["i"], len(self.scales)
        self.step = i + 1
        if self.callback is not None:
            self.callback(i)
        if self.img_callback is not None:
            self.img_callback(info["denoised"], i)
        index = steps - i - 1
        if index % self.log_every_t == 0 or index == steps - 1:
            self.intermediates["x_inter"].append(info["x"])
            self.intermediates["pred_x0"].append(info["denoised"])


class DiscreteTimeSampler:
    """CompVis-style sampler over a subset of the model's DDPM timesteps; see the module docstring."""

    sampler_function: Callable[..., torch.Tensor]  # sample_ddim or sample_plms

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
               ddim_discretize: str = "uniform", **kwargs: Any) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        """Run the sampler from x_T (drawn from `noise` when not given) over `S` steps.

        Returns the final latents and `{"x_inter": [...], "pred_x0": [...]}` logged every `log_every_t` steps.
        `noise` supplies x_T and every stochastic draw (eta > 0, masking); without it, seeds come from torch's global
        RNG as CompVis scripts expect. `normals_sequence` is accepted and ignored, as in CompVis. `ddim_discretize`
        picks the timesteps (`make_ddim_timesteps`: CompVis' "uniform", or diffusers' "trailing", which Hyper-SD's
        LoRAs are run with).
        """
        self._check_inputs(batch_size, conditioning, unconditional_conditioning, mask, x0, score_corrector,
                           noise, x_T)
        self.make_schedule(ddim_num_steps=S, ddim_discretize=ddim_discretize, ddim_eta=eta, verbose=verbose)
        scales = self._guidance_scales(unconditional_guidance_scale, ucg_schedule)
        noise = noise if noise is not None else ImageNoise.from_global_rng(batch_size)
        if x_T is None:
            x_T = noise.randn((batch_size, *shape), device=self.alphas_cumprod.device)
        knobs = {"temperature": temperature, "noise_dropout": noise_dropout,
                 "denoised_transform": self._denoised_transform(quantize_x0, dynamic_threshold), "mask": mask,
                 "x0": x0}
        return self._run(GuidedEpsModel(self.model, score_corrector, corrector_kwargs), conditioning,
                         unconditional_conditioning, x_T, len(self.ddim_timesteps), scales, noise, knobs, callback,
                         img_callback, log_every_t, verbose)

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

    def _denoised_transform(self, quantize_x0: bool, dynamic_threshold: float | None) -> DenoisedTransform | None:
        if not quantize_x0 and dynamic_threshold is None:
            return None

        def transform(pred_x0: torch.Tensor) -> torch.Tensor:
            if quantize_x0:
                pred_x0, *_ = self.model.first_stage_model.quantize(pred_x0)
            if dynamic_threshold is not None:
                pred_x0 = norm_thresholding(pred_x0, dynamic_threshold)
            return pred_x0
        return transform

    def _run(self, eps_model: GuidedEpsModel, cond: Any, uncond: Any, x: torch.Tensor, steps: int,
             scales: list[float], noise: ImageNoise, knobs: dict[str, Any],
             callback: Callable[[int], None] | None = None,
             img_callback: Callable[[torch.Tensor, int], None] | None = None, log_every_t: int = 100,
             verbose: bool = True) -> tuple[torch.Tensor, dict]:
        """`sampler_function` over the first `steps` scheduled timesteps, from the last of them down: step i uses
        schedule entry `steps - i - 1` and guidance scale `scales[i]`."""
        timesteps = [int(step) for step in self.ddim_timesteps[:steps][::-1]]
        # alphas_cumprod of each step, then of where the last step goes (alphas_cumprod[0])
        alphas = torch.cat([self.ddim_alphas[:steps].flip(0), self.ddim_alphas_prev[:1]])
        progress = CompVisProgress(x, scales, callback, img_callback, log_every_t)
        x = self.sampler_function(progress.guided(eps_model), x, timesteps, alphas,
                                  extra_args={"cond": cond, "uncond": uncond}, callback=progress, disable=not verbose,
                                  randn_like=noise.randn_like, **self._function_knobs(knobs))
        return x, progress.intermediates

    def _function_knobs(self, knobs: dict[str, Any]) -> dict[str, Any]:
        """The knobs `sampler_function` takes, from those of a CompVis `sample` call."""
        return knobs


class DDIMSampler(DiscreteTimeSampler):
    """DDIM over CompVis's timestep subset; eta > 0 adds the DDIM paper's stochasticity (eta = 1 is DDPM-like)."""

    sampler_function = staticmethod(sample_ddim)

    def _function_knobs(self, knobs: dict[str, Any]) -> dict[str, Any]:
        return {**knobs, "eta": self.ddim_eta}

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
        samples, _ = self._run(GuidedEpsModel(self.model), cond, unconditional_conditioning, x_latent, t_start,
                               [unconditional_guidance_scale] * t_start, noise, {}, callback=callback,
                               verbose=verbose)
        return samples
