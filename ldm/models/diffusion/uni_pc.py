"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of Diffusion
Models"): multistep data-prediction solver with the B(h) variants, as a k-diffusion style sampler.

Each step evaluates the denoiser once. The predictor (UniP-p) extrapolates from the last p denoised estimates; the
next step's evaluation, made at the predicted point, is then reused by the corrector (UniC) to refine that point
before the next prediction, raising the order by one at no extra model cost. The defaults (order 2, "bh2", the
corrector on every step, the last step first order) are those of diffusers' `UniPCMultistepScheduler`, which runs
on `CompVisDenoiser.get_sigmas_discrete(n)`.

Written in the k-diffusion variable x = x_t / sqrt(alphas_cumprod): with lambda = -log sigma and h = lambda_next -
lambda, the first-order part of a step is x_next = (sigma_next / sigma) x - expm1(-h) D, DPM-Solver++(1).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from tqdm.auto import trange

from ldm.models.diffusion.schedule import sigma_to_lambda

Denoiser = Callable[..., torch.Tensor]

VARIANTS = ("bh1", "bh2")


def _b_vector(hh: float, order: int, variant: str) -> tuple[list[float], float]:
    """The right-hand side b_k = k! phi_(k+1)(hh) / B(h), k = 1..order, of UniPC's order conditions, and B(h).

    phi_k are the exponential integrator functions evaluated at hh = -h; bh1 takes B(h) = hh, bh2 B(h) = expm1(hh).
    """
    big_b = hh if variant == "bh1" else math.expm1(hh)
    h_phi = math.expm1(hh) / hh - 1  # hh * phi_2(hh)
    b, factorial = [], 1
    for k in range(1, order + 1):
        b.append(h_phi * factorial / big_b)
        factorial *= k + 1
        h_phi = h_phi / hh - 1 / factorial
    return b, big_b


def _solve(ratios: list[float], b: list[float]) -> list[float]:
    """Weights rho solving sum_k rho_k r_k^(i-1) = b_i, i = 1..len(ratios): the Vandermonde order conditions."""
    size = len(ratios)
    vandermonde = torch.tensor([[r**i for r in ratios] for i in range(size)], dtype=torch.float64)
    return torch.linalg.solve(vandermonde, torch.tensor(b[:size], dtype=torch.float64)).tolist()


def _lambda(sigma: torch.Tensor) -> float:
    return sigma_to_lambda(float(sigma))  # a Python float: the step coefficients are computed in float64


def _first_order(x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
                 denoised: torch.Tensor) -> torch.Tensor:
    if sigma_next == 0:
        return denoised
    h = _lambda(sigma_next) - _lambda(sigma)
    return float(sigma_next / sigma) * x - math.expm1(-h) * denoised


def _differences(history: list[tuple[float, torch.Tensor]], lambda_now: float, h: float,
                 count: int) -> tuple[list[float], list[torch.Tensor]]:
    """Step ratios r_k = (lambda_k - lambda_now) / h and scaled differences (D_k - D_now) / r_k for the `count`
    estimates before the newest in `history` (newest last)."""
    denoised_now = history[-1][1]
    ratios, differences = [], []
    for k in range(1, count + 1):
        lambda_k, denoised_k = history[-1 - k]
        ratio = (lambda_k - lambda_now) / h
        ratios.append(ratio)
        differences.append((denoised_k - denoised_now) / ratio)
    return ratios, differences


def _predict(x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
             history: list[tuple[float, torch.Tensor]], order: int, variant: str) -> torch.Tensor:
    """UniP-`order`: the step sigma -> sigma_next from the newest `order` denoised estimates."""
    if order == 1 or sigma_next == 0:
        return _first_order(x, sigma, sigma_next, history[-1][1])
    lambda_now = history[-1][0]
    h = _lambda(sigma_next) - lambda_now
    ratios, differences = _differences(history, lambda_now, h, order - 1)
    b, big_b = _b_vector(-h, order, variant)
    # UniP-2 uses the fixed weight 1/2 of the paper (its order condition only holds to first order in h)
    rhos = [0.5] if order == 2 else _solve(ratios, b)
    x_next = _first_order(x, sigma, sigma_next, history[-1][1])
    return x_next - big_b * sum(rho * difference for rho, difference in zip(rhos, differences))


def _correct(x_previous: torch.Tensor, sigma_previous: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor,
             history: list[tuple[float, torch.Tensor]], order: int, variant: str) -> torch.Tensor:
    """UniC-`order`: redo the step sigma_previous -> sigma that UniP-`order` took, now also using `denoised`,
    the estimate at the predicted point (history holds the estimates up to sigma_previous)."""
    lambda_previous = history[-1][0]
    h = _lambda(sigma) - lambda_previous
    ratios, differences = _differences(history, lambda_previous, h, order - 1)
    b, big_b = _b_vector(-h, order, variant)
    rhos = [0.5] if order == 1 else _solve(ratios + [1.0], b)
    x = _first_order(x_previous, sigma_previous, sigma, history[-1][1])
    correction = rhos[-1] * (denoised - history[-1][1])
    correction = correction + sum(rho * difference for rho, difference in zip(rhos[:-1], differences))
    return x - big_b * correction


@torch.no_grad()
def sample_unipc(model: Denoiser, x: torch.Tensor, sigmas: torch.Tensor, extra_args: dict | None = None,
                 callback: Callable[[dict[str, Any]], None] | None = None, disable: bool | None = None,
                 order: int = 2, variant: str = "bh2", lower_order_final: bool = True, corrector: bool = True,
                 noise_sampler: Callable | None = None) -> torch.Tensor:
    """UniPC multistep sampling (Zhao et al. 2023), data prediction, predictor order `order` (1 to 3).

    `lower_order_final` caps the order at the number of steps left, as diffusers does; a step to sigma 0 is always
    first order (there is nothing to extrapolate to lambda = infinity). Deterministic: `noise_sampler` is ignored.
    """
    if order not in (1, 2, 3):
        raise ValueError(f"UniPC order {order} is not supported: use 1, 2 or 3")
    if variant not in VARIANTS:
        raise ValueError(f"UniPC variant {variant!r} is not supported: use one of {VARIANTS}")
    extra_args = extra_args or {}
    ones = x.new_ones([x.shape[0]])
    steps = len(sigmas) - 1
    history: list[tuple[float, torch.Tensor]] = []  # (lambda, denoised), newest last
    x_previous, previous_order = None, 0
    for i in trange(steps, disable=disable):
        denoised = model(x, sigmas[i] * ones, **extra_args)
        if corrector and x_previous is not None:
            x = _correct(x_previous, sigmas[i - 1], sigmas[i], denoised, history, previous_order, variant)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        history = (history + [(_lambda(sigmas[i]), denoised)])[-order:]
        step_order = min(order, steps - i) if lower_order_final else order
        step_order = min(step_order, i + 1)  # warm-up: only i + 1 estimates exist yet
        x_previous, previous_order = x, step_order
        x = _predict(x, sigmas[i], sigmas[i + 1], history, step_order, variant)
    return x
