"""The noise schedule of a discrete-time DDPM model, in every form a sampler reads it, from one tensor:
alphas_cumprod[t] for the timesteps t = 0..T-1 the model was trained on.

Three views of the same schedule, each in the arithmetic its samplers were written (and checked) in:
- noise levels sigma_t = sqrt((1 - alphas_cumprod[t]) / alphas_cumprod[t]), the variance-exploding variable of
  Karras et al. (2022) that the k-diffusion samplers step in, with fractional timesteps between them by linear
  interpolation in log sigma (`sigma_to_t`, `t_to_sigma`) and the sigma sequences of a run (`get_sigmas*`);
- the integer timesteps of a DDIM run and their update coefficients (`ddim_timesteps`, `ddim_coefficients`);
- DPM-Solver's continuous time t in [1/T, 1], DDPM step n sitting at t = (n + 1) / T, with log alpha_t
  (alpha_t = sqrt(alphas_cumprod)) piecewise linear in t between those points (`log_alpha_at`, `lambda_at`, ...).
The half log-SNR lambda = log(alpha / sigma_vp) = -log sigma links them: it is the same number in every view.

Tensors stay on the device and in the dtype of the alphas_cumprod given (the continuous-time view computes in
float32), so a caller decides where the schedule is computed by what it passes in.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from ldm.models.diffusion.k_schedules import append_zero, get_sigmas_karras

SKIP_TYPES = ("time_uniform", "logSNR", "time_quadratic")


def sigma_from_alpha_cumprod(alpha_cumprod: torch.Tensor) -> torch.Tensor:
    """The noise level of x / sqrt(alpha_cumprod): sqrt((1 - alpha_cumprod) / alpha_cumprod)."""
    return ((1 - alpha_cumprod) / alpha_cumprod) ** 0.5


def alpha_cumprod_from_sigma(sigma: torch.Tensor) -> torch.Tensor:
    """The alpha_cumprod of noise level `sigma`: 1 / (1 + sigma^2)."""
    return 1 / (1 + sigma**2)


def sigma_to_lambda(sigma: float | torch.Tensor) -> float | torch.Tensor:
    """The half log-SNR lambda = log(alpha / sigma_vp) = -log sigma of noise level `sigma` (DPM-Solver's time
    variable): a tensor for a tensor, a Python float (float64 arithmetic) for a float."""
    return -sigma.log() if torch.is_tensor(sigma) else -math.log(sigma)


def interpolate(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear f(x) through the points (xp, fp), xp ascending, continued linearly past both ends."""
    right = torch.searchsorted(xp, x).clamp(1, xp.shape[0] - 1)
    x_left, x_right, f_left, f_right = xp[right - 1], xp[right], fp[right - 1], fp[right]
    return f_left + (x - x_left) * (f_right - f_left) / (x_right - x_left)


def make_ddim_timesteps(method: str, num_steps: int, num_ddpm_timesteps: int) -> list[int]:
    """The DDPM timesteps a DDIM run visits, ascending, chosen as CompVis chooses them.

    "uniform" takes every `num_ddpm_timesteps // num_steps`-th step, so it returns more than `num_steps` steps when
    `num_steps` does not divide `num_ddpm_timesteps` (CompVis does the same); "quad" spaces them quadratically up to
    80% of the range. Every step is shifted by +1 so that the last update lands on alphas_cumprod[0]. "trailing" is
    diffusers' spacing of that name (Hyper-SD's and SDXL-Lightning's): round(k T / n) - 1 for k = 1..n, so the run
    starts at the last timestep, T - 1 (249, 499, 749, 999 for 4 of 1000).
    """
    if not 1 <= num_steps <= num_ddpm_timesteps:
        raise ValueError(f"the number of sampling steps must be between 1 and {num_ddpm_timesteps}, got {num_steps}")
    if method == "trailing":
        # numpy's float arange, as diffusers computes it, so that the rounding of k T / n is the same
        return [int(step) for step in np.round(np.arange(num_ddpm_timesteps, 0, -num_ddpm_timesteps / num_steps))[::-1]
                - 1]
    if method == "uniform":
        steps = list(range(0, num_ddpm_timesteps, num_ddpm_timesteps // num_steps))
    elif method == "quad":
        # float64 arithmetic of numpy.linspace(0, sqrt(0.8 N), num_steps) ** 2, truncated as CompVis truncates
        top = math.sqrt(num_ddpm_timesteps * 0.8)
        if num_steps == 1:
            points = [0.0]
        else:
            spacing = top / (num_steps - 1)
            points = [index * spacing for index in range(num_steps - 1)] + [top]
        steps = [int(point**2) for point in points]
    else:
        raise ValueError(f"ddim_discretize must be 'uniform', 'quad' or 'trailing', got {method!r}")
    return [step + 1 for step in steps]


@dataclass(frozen=True)
class DDIMCoefficients:
    """Per step of a DDIM run (ascending timesteps): alpha_t, the alpha it steps to, sqrt(1 - alpha_t) and the
    noise scale sigma_t of eq. 16 of the DDIM paper (Song et al. 2021)."""

    alphas: torch.Tensor
    alphas_prev: torch.Tensor
    sqrt_one_minus_alphas: torch.Tensor
    sigmas: torch.Tensor


def ddim_coefficients(alphas: torch.Tensor, alphas_prev: torch.Tensor, eta: float) -> DDIMCoefficients:
    """The DDIM coefficients of steps from alphas_cumprod `alphas` to `alphas_prev` (elementwise, any order)."""
    sigmas = eta * ((1 - alphas_prev) / (1 - alphas) * (1 - alphas / alphas_prev)).sqrt()
    return DDIMCoefficients(alphas, alphas_prev, (1.0 - alphas).sqrt(), sigmas)


class NoiseSchedule:
    """One discrete DDPM noise schedule, `alphas_cumprod` [T] decreasing with the timestep, in the views the
    samplers read (see the module docstring)."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        if alphas_cumprod.ndim != 1 or alphas_cumprod.shape[0] < 2:
            raise ValueError(f"alphas_cumprod must be one value per timestep (at least two), got shape "
                             f"{tuple(alphas_cumprod.shape)}")
        self.alphas_cumprod = alphas_cumprod
        self.num_timesteps = int(alphas_cumprod.shape[0])

    # --- noise levels (k-diffusion) ---------------------------------------------------------------------------------
    @cached_property
    def sigmas(self) -> torch.Tensor:
        """sigma_t for t = 0..T-1, increasing."""
        sigmas = sigma_from_alpha_cumprod(self.alphas_cumprod)
        if not bool((sigmas[1:] > sigmas[:-1]).all()):
            raise ValueError("a discrete schedule needs at least two sigmas, strictly increasing with t "
                             "(alphas_cumprod strictly decreasing)")
        return sigmas

    @cached_property
    def log_sigmas(self) -> torch.Tensor:
        return self.sigmas.log()

    @property
    def sigma_min(self) -> torch.Tensor:
        return self.sigmas[0]

    @property
    def sigma_max(self) -> torch.Tensor:
        return self.sigmas[-1]

    def sigma_to_t(self, sigma: torch.Tensor, quantize: bool = False) -> torch.Tensor:
        """The timestep of noise level `sigma`: the nearest in log sigma when quantizing (an integer tensor), else
        the fractional timestep found by interpolating log sigma linearly between neighbouring timesteps (in
        k-diffusion's arithmetic, so that the model sees the same fractional timesteps to the last bit)."""
        log_sigma = sigma.to(self.log_sigmas.dtype).log().reshape(-1)
        if quantize:
            distances = (log_sigma[None, :] - self.log_sigmas[:, None]).abs()  # [T, N]
            return distances.argmin(dim=0).reshape(sigma.shape)
        last = self.log_sigmas.numel() - 1
        low = (torch.searchsorted(self.log_sigmas, log_sigma, right=True) - 1).clamp(0, last - 1)
        low_log, high_log = self.log_sigmas[low], self.log_sigmas[low + 1]
        weight = ((low_log - log_sigma) / (low_log - high_log)).clamp(0, 1)
        return ((1 - weight) * low + weight * (low + 1)).reshape(sigma.shape)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        """The noise level of a (possibly fractional) timestep, interpolating log sigma linearly (in k-diffusion's
        arithmetic)."""
        t = t.to(self.log_sigmas.dtype)
        low = t.floor().long().clamp(0, self.log_sigmas.numel() - 1)
        high = t.ceil().long().clamp(0, self.log_sigmas.numel() - 1)
        weight = t - low
        return ((1 - weight) * self.log_sigmas[low] + weight * self.log_sigmas[high]).exp()

    def get_sigmas(self, n: int | None = None) -> torch.Tensor:
        """The model's own schedule as k-diffusion builds it: `n` timesteps evenly spaced from T-1 down to 0 (noise
        levels interpolated in log sigma between integer timesteps), then sigma 0. All T levels when n is None."""
        if n is None:
            return append_zero(self.sigmas.flip(0))
        if n < 1:
            raise ValueError(f"a schedule needs at least one step, got n={n}")
        t = torch.linspace(self.sigmas.numel() - 1, 0, n, device=self.sigmas.device, dtype=self.sigmas.dtype)
        return append_zero(self.t_to_sigma(t))

    def get_sigmas_discrete(self, n: int) -> torch.Tensor:
        """`n` integer timesteps round(k (T-1) / n) for k = n..1, then sigma 0: the spacing diffusers' multistep
        schedulers call "linspace" (it stops short of t=0 and leaves the last step to sigma 0)."""
        if n < 1:
            raise ValueError(f"a schedule needs at least one step, got n={n}")
        last = self.sigmas.numel() - 1
        # Python's round() rounds halves to even, as numpy does in diffusers
        timesteps = torch.tensor([round(k * last / n) for k in range(n, 0, -1)], device=self.sigmas.device)
        return append_zero(self.sigmas[timesteps])

    def get_sigmas_karras(self, n: int, rho: float = 7.0) -> torch.Tensor:
        """Karras et al. (2022)'s `n` sigmas between this schedule's sigma_max and sigma_min, then 0."""
        return get_sigmas_karras(n, self.sigma_min, self.sigma_max, rho=rho, device=self.sigmas.device,
                                 dtype=self.sigmas.dtype)

    # --- DDIM's integer timesteps -------------------------------------------------------------------------------------
    def ddim_timesteps(self, num_steps: int, method: str = "uniform") -> list[int]:
        """The timesteps of a `num_steps`-step DDIM run, ascending (`make_ddim_timesteps`)."""
        return make_ddim_timesteps(method, num_steps, self.num_timesteps)

    def ddim_coefficients(self, timesteps: list[int], eta: float) -> DDIMCoefficients:
        """The DDIM update coefficients at ascending `timesteps`; the step from the first (smallest) timestep goes
        to alphas_cumprod[0], not to 1. eta = 1 is DDPM's posterior variance, eta = 0 the deterministic sampler."""
        alphas_cumprod = self.alphas_cumprod
        index = torch.tensor(timesteps, device=alphas_cumprod.device)
        return ddim_coefficients(alphas_cumprod[index], torch.cat([alphas_cumprod[:1], alphas_cumprod[index[:-1]]]),
                                 eta)

    # --- DPM-Solver's continuous time ---------------------------------------------------------------------------------
    @cached_property
    def _log_alphas(self) -> torch.Tensor:
        return 0.5 * self.alphas_cumprod.float().log()  # log alpha at DDPM step n, i.e. at t = (n + 1) / T

    @cached_property
    def continuous_times(self) -> torch.Tensor:
        """t = (n + 1) / T of the DDPM steps n = 0..T-1 (float32)."""
        return torch.arange(1, self.num_timesteps + 1, device=self.alphas_cumprod.device,
                            dtype=torch.float32) / self.num_timesteps

    def log_alpha_at(self, t: torch.Tensor) -> torch.Tensor:
        return interpolate(t, self.continuous_times, self._log_alphas)

    def alpha_at(self, t: torch.Tensor) -> torch.Tensor:
        """alpha_t = sqrt(alphas_cumprod) at continuous time t."""
        return self.log_alpha_at(t).exp()

    def sigma_vp_at(self, t: torch.Tensor) -> torch.Tensor:
        """sigma_t = sqrt(1 - alpha_t^2) of the variance-preserving x_t, accurate where alpha_t ~ 1."""
        return (-torch.expm1(2 * self.log_alpha_at(t))).sqrt()

    def lambda_at(self, t: torch.Tensor) -> torch.Tensor:
        """Half log-SNR, log(alpha_t / sigma_t)."""
        log_alpha = self.log_alpha_at(t)
        return log_alpha - 0.5 * torch.log(-torch.expm1(2 * log_alpha))

    def time_at_lambda(self, lambda_: torch.Tensor) -> torch.Tensor:
        """The continuous time of half log-SNR `lambda_` (the inverse of `lambda_at`)."""
        log_alpha = -0.5 * torch.logaddexp(torch.zeros_like(lambda_), -2 * lambda_)
        return interpolate(log_alpha, self._log_alphas.flip(0), self.continuous_times.flip(0))

    def timestep_at(self, t: torch.Tensor) -> torch.Tensor:
        """The (fractional) DDPM timestep the model is conditioned on at continuous time t."""
        return (t - 1.0 / self.num_timesteps) * self.num_timesteps

    def dpm_solver_times(self, steps: int, skip_type: str = "time_uniform") -> torch.Tensor:
        """The `steps + 1` times from t = 1 down to t = 1/T: uniform in t, in lambda ("logSNR"), or in sqrt(t)."""
        device, t_end = self.continuous_times.device, 1.0 / self.num_timesteps
        if skip_type == "time_uniform":
            return torch.linspace(1.0, t_end, steps + 1, device=device)
        if skip_type == "logSNR":
            lambda_start, lambda_end = self.lambda_at(torch.tensor([1.0, t_end], device=device))
            return self.time_at_lambda(torch.linspace(lambda_start.item(), lambda_end.item(), steps + 1,
                                                      device=device))
        if skip_type == "time_quadratic":
            return torch.linspace(1.0, t_end**0.5, steps + 1, device=device) ** 2
        raise ValueError(f"skip_type must be one of {SKIP_TYPES}, got {skip_type!r}")
