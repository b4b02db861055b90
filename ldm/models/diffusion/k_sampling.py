"""The k-diffusion sampler family: plain functions over a denoiser and a sigma schedule.

Every sampler has the signature `sample_x(model, x, sigmas, extra_args=None, callback=None, disable=None, **knobs,
noise_sampler=None) -> x`, where `model(x, sigma [B], **extra_args)` returns the denoised estimate D(x, sigma)
(see k_denoisers.py), `x` starts at noise level `sigmas[0]` (x = unit noise * sigmas[0]) and `sigmas` decreases,
usually to 0. Randomness comes only from `noise_sampler(sigma, sigma_next)`, which returns fresh standard normal
noise shaped like `x` (`ImageNoise(seeds).noise_sampler(x)`); deterministic samplers accept and ignore it so that
every sampler can be called the same way. `callback` receives {"x", "i", "sigma", "sigma_hat", "denoised"} once
per step.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch
from tqdm.auto import trange

from ldm.models.diffusion.k_schedules import get_ancestral_step, to_d
from ldm.models.diffusion.schedule import sigma_to_lambda

Denoiser = Callable[..., torch.Tensor]
NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[dict[str, Any]], None]


def _require_noise(noise_sampler: NoiseSampler | None, sampler: str) -> NoiseSampler:
    if noise_sampler is None:
        raise ValueError(f"{sampler} adds noise but was given no noise_sampler: pass "
                         "noise_sampler=ImageNoise(seeds).noise_sampler(x), or set eta=0 / s_churn=0")
    return noise_sampler


def _churn(x: torch.Tensor, sigma: torch.Tensor, steps: int, s_churn: float, s_tmin: float, s_tmax: float,
           s_noise: float, noise_sampler: NoiseSampler | None, sampler: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Karras et al. (2022) Algorithm 2, lines 5-7: raise the noise level to sigma_hat = sigma (1 + gamma)."""
    gamma = min(s_churn / steps, 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
    sigma_hat = sigma * (gamma + 1)
    if gamma > 0:
        noise = _require_noise(noise_sampler, sampler)(sigma, sigma_hat)
        x = x + noise * s_noise * (sigma_hat**2 - sigma**2) ** 0.5
    return x, sigma_hat


def _report(callback: Callback | None, x: torch.Tensor, i: int, sigma: torch.Tensor, sigma_hat: torch.Tensor,
            denoised: torch.Tensor) -> None:
    if callback is not None:
        callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma_hat, "denoised": denoised})


@torch.no_grad()
def sample_euler(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                 callback: Callback | None = None, disable: bool | None = None, s_churn: float = 0.0,
                 s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
                 noise_sampler: NoiseSampler | None = None) -> torch.Tensor:
    """Euler steps of the probability-flow ODE, Algorithm 2 of Karras et al. (2022) (with optional churn)."""
    extra_args = extra_args or {}
    ones = x.new_ones([x.shape[0]])
    for i in trange(len(sigmas) - 1, disable=disable):
        x, sigma_hat = _churn(x, sigmas[i], len(sigmas) - 1, s_churn, s_tmin, s_tmax, s_noise, noise_sampler,
                              "sample_euler")
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
            noise = _require_noise(noise_sampler, "sample_euler_ancestral")(sigmas[i], sigmas[i + 1])
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
        x, sigma_hat = _churn(x, sigmas[i], len(sigmas) - 1, s_churn, s_tmin, s_tmax, s_noise, noise_sampler,
                              "sample_heun")
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
        x, sigma_hat = _churn(x, sigmas[i], len(sigmas) - 1, s_churn, s_tmin, s_tmax, s_noise, noise_sampler,
                              "sample_dpm_2")
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
            noise = _require_noise(noise_sampler, "sample_dpm_2_ancestral")(sigmas[i], sigmas[i + 1])
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
            noise = _require_noise(noise_sampler, "sample_dpmpp_2s_ancestral")(sigmas[i], sigmas[i + 1])
            x = x + noise * s_noise * sigma_up
    return x


class BrownianIncrements:
    """Normalized increments (W(sigma_next) - W(sigma)) / sqrt|sigma_next - sigma| of one Brownian path W over sigma,
    built from `noise_sampler`'s independent draws, one draw per new point of the path.

    k-diffusion's DPM++ SDE takes its noise from a Brownian tree (torchsde), so the two draws of a step, over
    [sigma, sigma_mid] and [sigma, sigma_next], are increments over overlapping intervals and correlated. Plain
    independent draws there leave the samples too narrow (on Gaussian data, std 0.42 instead of 0.5 at 15 steps).
    This path has the tree's joint law without torchsde. New points may only extend the path beyond those it has
    (as a sampler descending in sigma asks for them): drawing between two known points would need a Brownian bridge.
    """

    def __init__(self, noise_sampler: NoiseSampler):
        self.noise_sampler = noise_sampler
        self.path: dict[float, torch.Tensor] = {}  # sigma -> W(sigma)

    def _value(self, sigma: torch.Tensor, draw_args: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        time = float(sigma)
        if time in self.path:
            return self.path[time]
        if not self.path:
            self.path[time] = torch.zeros(())  # the path is pinned to 0 where it starts
            return self.path[time]
        low, high = min(self.path), max(self.path)
        if low < time < high:
            raise ValueError(f"BrownianIncrements only extends its path; sigma {time} lies inside the part already "
                             f"drawn, [{low}, {high}]")
        edge = low if time < low else high
        self.path[time] = self.path[edge] + abs(time - edge) ** 0.5 * self.noise_sampler(*draw_args)
        return self.path[time]

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        start = self._value(sigma, (sigma, sigma_next))
        end = self._value(sigma_next, (sigma, sigma_next))
        return (end - start) / abs(float(sigma_next) - float(sigma)) ** 0.5


@torch.no_grad()
def sample_dpmpp_sde(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                     callback: Callback | None = None, disable: bool | None = None, eta: float = 1.0,
                     s_noise: float = 1.0, r: float = 0.5, noise_sampler: NoiseSampler | None = None) -> torch.Tensor:
    """DPM-Solver++ (stochastic) of Lu et al. (2022): two stochastic DPM-Solver++ stages per step, the first to
    lambda + r h.

    `noise_sampler` must give independent draws: they are combined into Brownian increments (`BrownianIncrements`)
    with the joint law of k-diffusion's Brownian-tree noise but not its values, so a seed gives a different image
    than in k-diffusion (and, unlike a tree, a different one at each step count). The update formulas are the same.
    """
    extra_args = extra_args or {}
    ones = x.new_ones([x.shape[0]])
    brownian = BrownianIncrements(_require_noise(noise_sampler, "sample_dpmpp_sde")) if eta else None
    for i in trange(len(sigmas) - 1, disable=disable):
        denoised = model(x, sigmas[i] * ones, **extra_args)
        _report(callback, x, i, sigmas[i], sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
            continue
        lambda_now = sigma_to_lambda(sigmas[i])
        h = sigma_to_lambda(sigmas[i + 1]) - lambda_now
        sigma_mid = (-(lambda_now + r * h)).exp()

        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigma_mid, eta)
        x_mid = (sigma_down / sigmas[i]) * x - torch.expm1(lambda_now - sigma_to_lambda(sigma_down)) * denoised
        if sigma_up > 0:
            x_mid = x_mid + brownian(sigmas[i], sigma_mid) * s_noise * sigma_up
        denoised_mid = model(x_mid, sigma_mid * ones, **extra_args)

        sigma_down, sigma_up = get_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        mix = 1 / (2 * r)
        denoised_combined = (1 - mix) * denoised + mix * denoised_mid
        x = (sigma_down / sigmas[i]) * x - torch.expm1(lambda_now - sigma_to_lambda(sigma_down)) * denoised_combined
        if sigma_up > 0:
            x = x + brownian(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
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
                        s_noise: float = 1.0, solver_type: str = "midpoint",
                        noise_sampler: NoiseSampler | None = None) -> torch.Tensor:
    """DPM-Solver++(2M) SDE (Lu et al. 2022, the SDE variant of Algorithm 2). k-diffusion draws its noise from a
    Brownian tree; here `noise_sampler` gives independent draws (same formulas, different noise per seed)."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type {solver_type!r} is not supported: use 'midpoint' or 'heun'")
    extra_args = extra_args or {}
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
        decay = -torch.expm1(-h - eta_h)  # 1 - exp(-(1 + eta) h)
        x = (sigmas[i + 1] / sigmas[i]) * (-eta_h).exp() * x + decay * denoised
        if previous_denoised is not None:
            correction = (denoised - previous_denoised) * (h / previous_h)
            if solver_type == "heun":
                x = x + (decay / (-h - eta_h) + 1) * correction
            else:
                x = x + 0.5 * decay * correction
        if eta:
            noise = _require_noise(noise_sampler, "sample_dpmpp_2m_sde")(sigmas[i], sigmas[i + 1])
            x = x + noise * sigmas[i + 1] * (-torch.expm1(-2 * eta_h)).sqrt() * s_noise
        previous_denoised, previous_h = denoised, h
    return x
