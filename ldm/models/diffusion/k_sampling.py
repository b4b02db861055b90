"""The k-diffusion sampler family: plain functions over a denoiser and a sigma schedule.

Every sampler has k-diffusion's signature `sample_x(model, x, sigmas, extra_args=None, callback=None, disable=None,
**knobs) -> x`, where `model(x, sigma [B], **extra_args)` returns the denoised estimate D(x, sigma) (see
k_denoisers.py), `x` starts at noise level `sigmas[0]` (x = unit noise * sigmas[0]) and `sigmas` decreases, usually to
0; DPM-Solver fast and adaptive take a sigma range instead (k_dpm_solver.py, re-exported here). `callback` receives
{"x", "i", "sigma", "sigma_hat", "denoised"} once per step.

Randomness comes only from `noise_sampler(sigma, sigma_next)`, which returns standard normal noise shaped like `x`
(`ImageNoise(seeds).noise_sampler(x)` gives each image its own stream). `noise_sampler=None` means what it means in
k-diffusion: fresh `torch.randn_like` draws for the ancestral samplers, and for the SDE samplers (DPM++ SDE, 2M SDE,
3M SDE) a Brownian tree over the run's sigma range (brownian.py); both then take their seed from torch's global
generator, so the sampler registry always passes a noise sampler. Deterministic samplers accept and ignore it so that
every sampler can be called the same way; Euler, Heun and DPM2 draw from it only with churn (`s_churn > 0`), then at
every step as k-diffusion does.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import trange

from ldm.models.diffusion.brownian import BrownianTreeNoiseSampler, NoiseSampler, default_noise_sampler
from ldm.models.diffusion.k_dpm_solver import DPMSolver, sample_dpm_adaptive, sample_dpm_fast
from ldm.models.diffusion.k_schedules import get_ancestral_step, get_sigmas_karras, to_d
from ldm.models.diffusion.schedule import sigma_to_lambda

__all__ = ["BrownianTreeNoiseSampler", "DPMSolver", "default_noise_sampler", "linear_multistep_coeff",
           "sample_dpm_2", "sample_dpm_2_ancestral", "sample_dpm_adaptive", "sample_dpm_fast", "sample_dpmpp_2m",
           "sample_dpmpp_2m_sde", "sample_dpmpp_2s_ancestral", "sample_dpmpp_3m_sde", "sample_dpmpp_sde",
           "sample_euler", "sample_euler_ancestral", "sample_euler_ancestral_cfg_pp", "sample_euler_cfg_pp",
           "sample_heun", "sample_lcm", "sample_lms", "sample_restart"]

Denoiser = Callable[..., torch.Tensor]
Callback = Callable[[dict[str, Any]], None]


def _or_default(noise_sampler: NoiseSampler | None, x: torch.Tensor) -> NoiseSampler:
    return default_noise_sampler(x) if noise_sampler is None else noise_sampler


def _or_brownian(noise_sampler: NoiseSampler | None, x: torch.Tensor, sigmas: torch.Tensor) -> NoiseSampler:
    """k-diffusion's default for its SDE samplers: a Brownian tree over the positive sigmas of the run."""
    if noise_sampler is not None:
        return noise_sampler
    return BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max())


def _churn(x: torch.Tensor, sigma: torch.Tensor, steps: int, s_churn: float, s_tmin: float, s_tmax: float,
           s_noise: float, noise_sampler: NoiseSampler | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Karras et al. (2022) Algorithm 2, lines 5-7: raise the noise level to sigma_hat = sigma (1 + gamma). With churn
    on, every step draws (as k-diffusion's do), so step i always takes the i-th draw whether or not it adds it."""
    gamma = min(s_churn / steps, 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
    sigma_hat = sigma * (gamma + 1)
    if s_churn > 0:
        noise = _or_default(noise_sampler, x)(sigma, sigma_hat)
        if gamma > 0:
            x = x + noise * s_noise * (sigma_hat**2 - sigma**2) ** 0.5
    return x, sigma_hat


def _report(callback: Callback | None, x: torch.Tensor, i: int, sigma: torch.Tensor, sigma_hat: torch.Tensor,
            denoised: torch.Tensor) -> None:
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma_hat, "denoised": denoised})


def _sigma_of(t: torch.Tensor) -> torch.Tensor:
    """The noise level at half log-SNR t = -log sigma (k-diffusion's sigma_fn)."""
    return t.neg().exp()


@torch.no_grad()
def sample_euler(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                 callback: Callback | None = None, disable: bool | None = None, s_churn: float = 0.0,
                 s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
                 noise_sampler: NoiseSampler | None = None) -> torch.Tensor:
    """Euler steps of the probability-flow ODE, Algorithm 2 of Karras et al. (2022) (with optional churn)."""
    extra_args = extra_args or {}
    ones = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        x, sigma_hat = _churn(x, sigmas[i], len(sigmas) - 1, s_churn, s_tmin, s_tmax, s_noise, noise_sampler)
        denoised = model(x, sigma_hat * ones, **extra_args)
        _report(callback, x, i, sigmas[i], sigma_hat, denoised)
        x = x + to_d(x, sigma_hat, denoised) * (sigmas[i + 1] - sigma_hat)
    return x


@torch.no_grad()
def sample_euler_ancestral(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                           callback: Callback | None = None, disable: bool | None = None, eta: float = 1.0,
                           s_noise: float = 1.0, noise_sampler: NoiseSampler | None = None) -> torch.Tensor:
    """Ancestral sampling with Euler steps: an Euler step down to sigma_down, then fresh noise up to sigma_next."""
    extra_args = extra_args or {}
    ones = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * ones, **extra_args)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0 and sigma_up > 0:
            noise = _or_default(noise_sampler, x)(sigmas[i], sigmas[i + 1])
            x = x + noise * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_heun(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                callback: Callback | None = None, disable: bool | None = None, s_churn: float = 0.0,
                s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
                noise_sampler: NoiseSampler | None = None) -> torch.Tensor:
    """Heun's second-order method, Algorithm 2 of Karras et al. (2022); an Euler step for the last step to 0."""
    extra_args = extra_args or {}
    ones = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        x, sigma_hat = _churn(x, sigmas[i], len(sigmas) - 1, s_churn, s_tmin, s_tmax, s_noise, noise_sampler)
        denoised = model(x, sigma_hat * ones, **extra_args)
        _report(callback, x, i, sigmas[i], sigma_hat, denoised)
        d = to_d(x, sigma_hat, denoised)
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == 0:
            x = x + d * dt
            continue
        x_euler = x + d * dt
        d_next = to_d(x_euler, sigmas[i + 1], model(x_euler, sigmas[i + 1] * ones, **extra_args))
        x = x + (d + d_next) / 2 * dt
    return x


@torch.no_grad()
def sample_dpm_2(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                 callback: Callback | None = None, disable: bool | None = None, s_churn: float = 0.0,
                 s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
                 noise_sampler: NoiseSampler | None = None) -> torch.Tensor:
    """The midpoint method with the midpoint taken in log sigma, after DPM-Solver-2 (Lu et al. 2022) and
    Algorithm 2 of Karras et al. (2022); an Euler step for the last step to 0."""
    extra_args = extra_args or {}
    ones = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        x, sigma_hat = _churn(x, sigmas[i], len(sigmas) - 1, s_churn, s_tmin, s_tmax, s_noise, noise_sampler)
        denoised = model(x, sigma_hat * ones, **extra_args)
        _report(callback, x, i, sigmas[i], sigma_hat, denoised)
        d = to_d(x, sigma_hat, denoised)
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigma_hat)
            continue
        sigma_mid = torch.lerp(sigma_hat.log(), sigmas[i + 1].log(), 0.5).exp()
        x_mid = x + d * (sigma_mid - sigma_hat)
        d_mid = to_d(x_mid, sigma_mid, model(x_mid, sigma_mid * ones, **extra_args))
        x = x + d_mid * (sigmas[i + 1] - sigma_hat)
    return x


@torch.no_grad()
def sample_dpm_2_ancestral(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                           callback: Callback | None = None, disable: bool | None = None, eta: float = 1.0,
                           s_noise: float = 1.0, noise_sampler: NoiseSampler | None = None) -> torch.Tensor:
    """Ancestral sampling with `sample_dpm_2`'s log-sigma midpoint steps down to sigma_down."""
    extra_args = extra_args or {}
    ones = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * ones, **extra_args)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        d = to_d(x, sigmas[i], denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigmas[i])
            continue
        sigma_mid = torch.lerp(sigmas[i].log(), sigma_down.log(), 0.5).exp()
        x_mid = x + d * (sigma_mid - sigmas[i])
        d_mid = to_d(x_mid, sigma_mid, model(x_mid, sigma_mid * ones, **extra_args))
        x = x + d_mid * (sigma_down - sigmas[i])
        if sigma_up > 0:
            noise = _or_default(noise_sampler, x)(sigmas[i], sigmas[i + 1])
            x = x + noise * s_noise * sigma_up
    return x


def linear_multistep_coeff(order: int, sigmas: np.ndarray, i: int, j: int) -> float:
    """Adams-Bashforth weight of the derivative at sigmas[i - j] for the step sigmas[i] -> sigmas[i + 1]: the
    integral over that step of the Lagrange basis polynomial through sigmas[i], ..., sigmas[i - order + 1].

    The integrand is a polynomial of degree order - 1, so Gauss-Legendre quadrature with `order` nodes (exact up
    to degree 2 order - 1) gives the integral exactly.
    """
    if order - 1 > i:
        raise ValueError(f"a linear multistep step of order {order} needs {order - 1} earlier steps; step {i} has {i}")
    start, end = float(sigmas[i]), float(sigmas[i + 1])
    nodes, weights = np.polynomial.legendre.leggauss(order)
    taus = (end - start) / 2 * nodes + (end + start) / 2  # nodes mapped from [-1, 1] onto the step
    basis = np.ones_like(taus)
    for k in range(order):
        if k != j:
            basis *= (taus - sigmas[i - k]) / (sigmas[i - j] - sigmas[i - k])
    return float((end - start) / 2 * np.dot(weights, basis))


@torch.no_grad()
def sample_lms(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
               callback: Callback | None = None, disable: bool | None = None, order: int = 4,
               noise_sampler: NoiseSampler | None = None) -> torch.Tensor:
    """Linear multistep (Adams-Bashforth) in sigma over the last `order` derivatives, as in k-diffusion."""
    extra_args = extra_args or {}
    ones = x.new_ones([x.shape[0]])
    sigmas_host = sigmas.detach().cpu().double().numpy()
    derivatives: list[torch.Tensor] = []  # newest last
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * ones, **extra_args)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        derivatives = (derivatives + [to_d(x, sigmas[i], denoised)])[-order:]
        current_order = min(i + 1, order)
        coeffs = [linear_multistep_coeff(current_order, sigmas_host, i, j) for j in range(current_order)]
        x = x + sum(coeff * d for coeff, d in zip(coeffs, reversed(derivatives)))
    return x


@torch.no_grad()
def sample_dpmpp_2s_ancestral(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                              callback: Callback | None = None, disable: bool | None = None, eta: float = 1.0,
                              s_noise: float = 1.0, noise_sampler: NoiseSampler | None = None) -> torch.Tensor:
    """Ancestral sampling with DPM-Solver++(2S) single-step second-order steps (Lu et al. 2022, Algorithm 1)."""
    extra_args = extra_args or {}
    ones = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * ones, **extra_args)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        if sigma_down == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            h = sigma_to_lambda(sigma_down) - sigma_to_lambda(sigmas[i])
            sigma_mid = (sigmas[i] * sigma_down) ** 0.5  # lambda halfway between the two
            x_mid = (sigma_mid / sigmas[i]) * x - torch.expm1(-h / 2) * denoised
            denoised_mid = model(x_mid, sigma_mid * ones, **extra_args)
            x = (sigma_down / sigmas[i]) * x - torch.expm1(-h) * denoised_mid
        if sigmas[i + 1] > 0 and sigma_up > 0:
            noise = _or_default(noise_sampler, x)(sigmas[i], sigmas[i + 1])
            x = x + noise * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_dpmpp_sde(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                     callback: Callback | None = None, disable: bool | None = None, eta: float = 1.0,
                     s_noise: float = 1.0, noise_sampler: NoiseSampler | None = None, r: float = 0.5) -> torch.Tensor:
    """DPM-Solver++ (stochastic) of Lu et al. (2022): two stochastic DPM-Solver++ stages per step, the first to
    lambda + r h; Brownian-tree noise unless `noise_sampler` is given."""
    extra_args = extra_args or {}
    noise_sampler = _or_brownian(noise_sampler, x, sigmas) if eta else None
    ones = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * ones, **extra_args)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
            continue
        # in half log-SNR time t = -log sigma; the noise is queried at sigma(t), as k-diffusion queries its tree
        t, t_next = sigma_to_lambda(sigmas[i]), sigma_to_lambda(sigmas[i + 1])
        sigma, sigma_next = _sigma_of(t), _sigma_of(t_next)
        sigma_mid = _sigma_of(t + (t_next - t) * r)

        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_mid, eta)
        t_down = sigma_to_lambda(sigma_down)
        x_mid = (_sigma_of(t_down) / sigma) * x - (t - t_down).expm1() * denoised
        if noise_sampler is not None:
            x_mid = x_mid + noise_sampler(sigma, sigma_mid) * s_noise * sigma_up
        denoised_mid = model(x_mid, sigma_mid * ones, **extra_args)

        sigma_down, sigma_up = get_ancestral_step(sigma, sigma_next, eta)
        t_down = sigma_to_lambda(sigma_down)
        mix = 1 / (2 * r)
        denoised_combined = (1 - mix) * denoised + mix * denoised_mid
        x = (_sigma_of(t_down) / sigma) * x - (t - t_down).expm1() * denoised_combined
        if noise_sampler is not None:
            x = x + noise_sampler(sigma, sigma_next) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_dpmpp_2m(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                    callback: Callback | None = None, disable: bool | None = None,
                    noise_sampler: NoiseSampler | None = None) -> torch.Tensor:
    """DPM-Solver++(2M), the multistep second-order solver of Lu et al. (2022), Algorithm 2; first order on the
    first step and on a last step to sigma 0."""
    extra_args = extra_args or {}
    ones = x.new_ones([x.shape[0]])
    previous_denoised = None
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * ones, **extra_args)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        h = sigma_to_lambda(sigmas[i + 1]) - sigma_to_lambda(sigmas[i])
        if previous_denoised is None or sigmas[i + 1] == 0:
            estimate = denoised
        else:
            # the previous step's size over this one
            ratio = (sigma_to_lambda(sigmas[i]) - sigma_to_lambda(sigmas[i - 1])) / h
            estimate = (1 + 1 / (2 * ratio)) * denoised - (1 / (2 * ratio)) * previous_denoised
        x = (sigmas[i + 1] / sigmas[i]) * x - torch.expm1(-h) * estimate
        previous_denoised = denoised
    return x


@torch.no_grad()
def sample_dpmpp_2m_sde(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                        callback: Callback | None = None, disable: bool | None = None, eta: float = 1.0,
                        s_noise: float = 1.0, noise_sampler: NoiseSampler | None = None,
                        solver_type: str = "midpoint") -> torch.Tensor:
    """DPM-Solver++(2M) SDE (Lu et al. 2022, the SDE variant of Algorithm 2) with k-diffusion's "midpoint" or
    "heun" second-order correction; Brownian-tree noise unless `noise_sampler` is given."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type {solver_type!r} is not supported: use 'midpoint' or 'heun'")
    extra_args = extra_args or {}
    noise_sampler = _or_brownian(noise_sampler, x, sigmas) if eta else None
    ones = x.new_ones([x.shape[0]])
    previous_denoised, previous_h = None, None
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * ones, **extra_args)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        h = sigma_to_lambda(sigmas[i + 1]) - sigma_to_lambda(sigmas[i])
        eta_h = eta * h
        decay = (-h - eta_h).expm1().neg()  # 1 - exp(-(1 + eta) h)
        x = sigmas[i + 1] / sigmas[i] * (-eta_h).exp() * x + decay * denoised
        if previous_denoised is not None:
            ratio = previous_h / h
            if solver_type == "heun":
                x = x + (decay / (-h - eta_h) + 1) * (1 / ratio) * (denoised - previous_denoised)
            else:
                x = x + 0.5 * decay * (1 / ratio) * (denoised - previous_denoised)
        if noise_sampler is not None:
            noise = noise_sampler(sigmas[i], sigmas[i + 1])
            x = x + noise * sigmas[i + 1] * (-2 * eta_h).expm1().neg().sqrt() * s_noise
        previous_denoised, previous_h = denoised, h
    return x


@torch.no_grad()
def sample_dpmpp_3m_sde(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                        callback: Callback | None = None, disable: bool | None = None, eta: float = 1.0,
                        s_noise: float = 1.0, noise_sampler: NoiseSampler | None = None) -> torch.Tensor:
    """DPM-Solver++(3M) SDE: the third-order multistep data-prediction solver of Lu et al. (2022) on the SDE, with
    first- and second-order starts; Brownian-tree noise unless `noise_sampler` is given."""
    extra_args = extra_args or {}
    noise_sampler = _or_brownian(noise_sampler, x, sigmas) if eta else None
    ones = x.new_ones([x.shape[0]])
    denoised_1, denoised_2 = None, None  # the last two steps' estimates, newest first
    h_1, h_2 = None, None
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * ones, **extra_args)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = sigma_to_lambda(sigmas[i + 1]) - sigma_to_lambda(sigmas[i])
            h_eta = h * (eta + 1)
            x = torch.exp(-h_eta) * x + (-h_eta).expm1().neg() * denoised
            phi_2 = h_eta.neg().expm1() / h_eta + 1
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (denoised - denoised_1) / r0
                d1_1 = (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                x = x + phi_2 * ((denoised - denoised_1) / (h_1 / h))
            if noise_sampler is not None:
                noise = noise_sampler(sigmas[i], sigmas[i + 1])
                x = x + noise * sigmas[i + 1] * (-2 * h * eta).expm1().neg().sqrt() * s_noise
            h_1, h_2 = h, h_1
        denoised_1, denoised_2 = denoised, denoised_1
    return x


@torch.no_grad()
def sample_lcm(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
               callback: Callback | None = None, disable: bool | None = None,
               noise_sampler: NoiseSampler | None = None) -> torch.Tensor:
    """Latent Consistency Model multistep sampling (Luo et al. 2023): jump to the consistency model's clean estimate,
    then noise it afresh to the next sigma. Needs the LCM denoiser (`LCMCompVisDenoiser`)."""
    extra_args = extra_args or {}
    ones = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * ones, **extra_args)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        x = denoised
        if sigmas[i + 1] > 0:
            x = x + sigmas[i + 1] * _or_default(noise_sampler, x)(sigmas[i], sigmas[i + 1])
    return x


def _cfg_pp_steps(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None,
                  callback: Callback | None, disable: bool | None, eta: float, s_noise: float,
                  noise_sampler: NoiseSampler | None) -> torch.Tensor:
    extra_args = extra_args or {}
    ones = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised, uncond_denoised = model(x, sigmas[i] * ones, **extra_args, return_uncond=True)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        # CFG++: the guided estimate, renoised along the unconditional model's noise direction
        x = denoised + to_d(x, sigmas[i], uncond_denoised) * sigma_down
        if sigmas[i + 1] > 0 and sigma_up > 0:
            x = x + _or_default(noise_sampler, x)(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
    return x


@torch.no_grad()
def sample_euler_cfg_pp(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                        callback: Callback | None = None, disable: bool | None = None,
                        noise_sampler: NoiseSampler | None = None) -> torch.Tensor:
    """Euler steps under CFG++ (Chung et al. 2024, "Manifold-constrained classifier free guidance"): the model is
    called with `return_uncond=True` and returns (guided, unconditional) estimates; the guidance scale is CFG++'s,
    about 0 to 1, not classifier-free guidance's."""
    return _cfg_pp_steps(model, x, sigmas, extra_args, callback, disable, 0.0, 1.0, noise_sampler)


@torch.no_grad()
def sample_euler_ancestral_cfg_pp(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor,
                                  extra_args: dict | None = None, callback: Callback | None = None,
                                  disable: bool | None = None, eta: float = 1.0, s_noise: float = 1.0,
                                  noise_sampler: NoiseSampler | None = None) -> torch.Tensor:
    """Ancestral Euler steps under CFG++ (see `sample_euler_cfg_pp`). On a DDPM model's integer timesteps this is
    DDIM with CFG++ (Chung et al. 2024, Algorithm 2), `eta` being DDIM's."""
    return _cfg_pp_steps(model, x, sigmas, extra_args, callback, disable, eta, s_noise, noise_sampler)


def restart_schedule(sigmas: torch.Tensor, restart_list: dict[float, list] | None = None) -> list[tuple]:
    """The (sigma, sigma_next) steps of a Restart run over `sigmas`, as AUTOMATIC1111 plans them.

    `restart_list` {sigma_min: [restart_steps, restart_times, sigma_max]}: after the step that lands nearest sigma_min,
    jump back to the schedule's sigma nearest sigma_max and descend again over `restart_steps - 1` Karras steps, that
    many `restart_times`. None chooses as AUTOMATIC1111 does: nothing below 20 steps; from 20 steps, a Karras
    schedule of the remaining steps with one 9-step restart from 0.1 to 2 (from 36 steps, two of steps // 4).
    """
    steps = sigmas.shape[0] - 1
    if restart_list is None:
        restart_list = {}
        if steps >= 20:
            restart_steps, restart_times = (steps // 4, 2) if steps >= 36 else (9, 1)
            sigmas = get_sigmas_karras(steps - restart_steps * restart_times, sigmas[-2].item(), sigmas[0].item(),
                                       device=sigmas.device).to(sigmas.dtype)
            restart_list = {0.1: [restart_steps + 1, restart_times, 2]}
    by_index = {int(torch.argmin((sigmas - key).abs(), dim=0)): value for key, value in restart_list.items()}
    plan = []
    for i in range(len(sigmas) - 1):
        plan.append((sigmas[i], sigmas[i + 1]))
        if i + 1 in by_index:
            restart_steps, restart_times, restart_max = by_index[i + 1]
            max_index = int(torch.argmin((sigmas - restart_max).abs(), dim=0))
            if max_index < i + 1:
                restart = get_sigmas_karras(restart_steps, sigmas[i + 1].item(), sigmas[max_index].item(),
                                            device=sigmas.device).to(sigmas.dtype)[:-1]
                plan.extend(list(zip(restart[:-1], restart[1:])) * restart_times)
    return plan


@torch.no_grad()
def sample_restart(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                   callback: Callback | None = None, disable: bool | None = None, s_noise: float = 1.0,
                   restart_list: dict[float, list] | None = None,
                   noise_sampler: NoiseSampler | None = None) -> torch.Tensor:
    """Restart sampling (Xu et al. 2023, "Restart sampling for improving generative processes"), as AUTOMATIC1111
    runs it: Heun steps down the plan of `restart_schedule`, and before each jump back up fresh noise that raises
    the noise level from where the last step landed to where the next one starts."""
    extra_args = extra_args or {}
    ones = x.new_ones([x.shape[0]])
    last_sigma = None
    for i, (sigma, sigma_next) in enumerate(restart_schedule(sigmas, restart_list)):
        if last_sigma is not None and last_sigma < sigma:
            x = x + _or_default(noise_sampler, x)(last_sigma, sigma) * s_noise * (sigma**2 - last_sigma**2) ** 0.5
        denoised = model(x, sigma * ones, **extra_args)
        _report(callback, x, i, sigma, sigma, denoised)
        d = to_d(x, sigma, denoised)
        if sigma_next == 0:
            x = x + d * (sigma_next - sigma)
        else:
            x_euler = x + d * (sigma_next - sigma)
            d_next = to_d(x_euler, sigma_next, model(x_euler, sigma_next * ones, **extra_args))
            x = x + (d + d_next) / 2 * (sigma_next - sigma)
        last_sigma = sigma_next
    return x
