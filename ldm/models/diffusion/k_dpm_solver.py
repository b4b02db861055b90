"""DPM-Solver (Lu et al. 2022, "DPM-Solver: a fast ODE solver for diffusion probabilistic model sampling in around
10 steps") on a k-diffusion denoiser: k-diffusion's "DPM fast" (fixed steps of orders 3, 2, 1 uniform in
t = -log sigma) and "DPM adaptive" (embedded orders 1/2 or 2/3 with a PID step-size controller).

Both take the range [sigma_min, sigma_max] (both > 0) rather than a sigma schedule, and end at sigma_min, not 0. With
`eta` > 0 each step is ancestral: it solves down to the sigma_down of `get_ancestral_step` and adds fresh noise from
`noise_sampler(sigma, sigma_next)` (None: fresh `torch.randn_like` draws, as in k-diffusion).
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from tqdm.auto import tqdm

from ldm.models.diffusion.brownian import NoiseSampler, default_noise_sampler
from ldm.models.diffusion.k_schedules import get_ancestral_step

Callback = Callable[[dict[str, Any]], None]
EpsCache = dict[str, torch.Tensor]


class PIDStepSizeController:
    """PID control of an ODE step size from the scaled error of each step (Söderlind 2003), with the arctan limiter;
    `propose_step` rescales `h` and says whether the step is accepted."""

    def __init__(self, h: float, pcoeff: float, icoeff: float, dcoeff: float, order: float = 1,
                 accept_safety: float = 0.81, eps: float = 1e-8):
        self.h = h
        self.b1 = (pcoeff + icoeff + dcoeff) / order
        self.b2 = -(pcoeff + 2 * dcoeff) / order
        self.b3 = dcoeff / order
        self.accept_safety = accept_safety
        self.eps = eps
        self.inverse_errors: list[float] = []  # of this step and the last two accepted ones

    @staticmethod
    def limiter(factor: float) -> float:
        return 1 + math.atan(factor - 1)

    def propose_step(self, error: torch.Tensor | float) -> bool:
        inverse_error = 1 / (float(error) + self.eps)
        if not self.inverse_errors:
            self.inverse_errors = [inverse_error] * 3
        self.inverse_errors[0] = inverse_error
        e0, e1, e2 = self.inverse_errors
        factor = self.limiter(e0**self.b1 * e1**self.b2 * e2**self.b3)
        accept = factor >= self.accept_safety
        if accept:
            self.inverse_errors = [e0, e0, e1]
        self.h *= factor
        return accept


class DPMSolver:
    """DPM-Solver-1, -2 and -3 steps in t = -log sigma for a denoiser `model(x, sigma, **extra_args)`, evaluating the
    noise prediction eps = (x - D(x, sigma)) / sigma once per stage (cached per step under "eps", "eps_r1", "eps_r2")."""

    def __init__(self, model: Callable[..., torch.Tensor], extra_args: dict | None = None,
                 eps_callback: Callable[[], Any] | None = None, info_callback: Callback | None = None):
        self.model = model
        self.extra_args = extra_args or {}
        self.eps_callback = eps_callback
        self.info_callback = info_callback

    @staticmethod
    def t(sigma: torch.Tensor) -> torch.Tensor:
        return -sigma.log()

    @staticmethod
    def sigma(t: torch.Tensor) -> torch.Tensor:
        return t.neg().exp()

    def eps(self, cache: EpsCache, key: str, x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, EpsCache]:
        if key in cache:
            return cache[key], cache
        sigma = self.sigma(t) * x.new_ones([x.shape[0]])
        eps = (x - self.model(x, sigma, **self.extra_args)) / self.sigma(t)
        if self.eps_callback is not None:
            self.eps_callback()
        return eps, {key: eps, **cache}

    def dpm_solver_1_step(self, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor,
                          eps_cache: EpsCache | None = None) -> tuple[torch.Tensor, EpsCache]:
        """DPM-Solver-1 (DDIM): x_next = x - sigma_next (e^h - 1) eps."""
        h = t_next - t
        eps, cache = self.eps(eps_cache or {}, "eps", x, t)
        return x - self.sigma(t_next) * h.expm1() * eps, cache

    def dpm_solver_2_step(self, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, r1: float = 1 / 2,
                          eps_cache: EpsCache | None = None) -> tuple[torch.Tensor, EpsCache]:
        """DPM-Solver-2 (Algorithm 4 of the paper), its intermediate point at t + r1 h."""
        h = t_next - t
        eps, cache = self.eps(eps_cache or {}, "eps", x, t)
        s1 = t + r1 * h
        u1 = x - self.sigma(s1) * (r1 * h).expm1() * eps
        eps_r1, cache = self.eps(cache, "eps_r1", u1, s1)
        x_next = x - self.sigma(t_next) * h.expm1() * eps - self.sigma(t_next) / (2 * r1) * h.expm1() * (eps_r1 - eps)
        return x_next, cache

    def dpm_solver_3_step(self, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, r1: float = 1 / 3,
                          r2: float = 2 / 3, eps_cache: EpsCache | None = None) -> tuple[torch.Tensor, EpsCache]:
        """DPM-Solver-3 (Algorithm 5 of the paper), its intermediate points at t + r1 h and t + r2 h."""
        h = t_next - t
        eps, cache = self.eps(eps_cache or {}, "eps", x, t)
        s1, s2 = t + r1 * h, t + r2 * h
        u1 = x - self.sigma(s1) * (r1 * h).expm1() * eps
        eps_r1, cache = self.eps(cache, "eps_r1", u1, s1)
        phi_r2 = (r2 * h).expm1() / (r2 * h) - 1
        u2 = x - self.sigma(s2) * (r2 * h).expm1() * eps - self.sigma(s2) * (r2 / r1) * phi_r2 * (eps_r1 - eps)
        eps_r2, cache = self.eps(cache, "eps_r2", u2, s2)
        x_next = x - self.sigma(t_next) * h.expm1() * eps - self.sigma(t_next) / r2 * (h.expm1() / h - 1) * (eps_r2 - eps)
        return x_next, cache

    def _step(self, order: int, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor, cache: EpsCache,
              **r: float) -> tuple[torch.Tensor, EpsCache]:
        step = {1: self.dpm_solver_1_step, 2: self.dpm_solver_2_step, 3: self.dpm_solver_3_step}[order]
        return step(x, t, t_next, eps_cache=cache, **r)

    def _ancestral_target(self, t: torch.Tensor, t_next: torch.Tensor, t_end: torch.Tensor,
                          eta: float) -> tuple[torch.Tensor, torch.Tensor | float]:
        """Where an ancestral step from t towards t_next solves to, and the noise it then adds."""
        if not eta:
            return t_next, 0.0
        sigma_down, _ = get_ancestral_step(self.sigma(t), self.sigma(t_next), eta)
        t_down = torch.minimum(t_end, self.t(sigma_down))
        return t_down, (self.sigma(t_next) ** 2 - self.sigma(t_down) ** 2) ** 0.5

    def dpm_solver_fast(self, x: torch.Tensor, t_start: torch.Tensor, t_end: torch.Tensor, nfe: int,
                        eta: float = 0.0, s_noise: float = 1.0,
                        noise_sampler: NoiseSampler | None = None) -> torch.Tensor:
        """DPM-Solver-fast (section 3.4 of the paper): `nfe` evaluations over floor(nfe / 3) + 1 steps uniform in t,
        order 3 except the last one or two."""
        if not t_end > t_start and eta:
            raise ValueError("eta must be 0 for reverse sampling (t_end below t_start)")
        noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
        steps = math.floor(nfe / 3) + 1
        ts = torch.linspace(t_start, t_end, steps + 1, device=x.device)
        orders = [3] * (steps - 2) + [2, 1] if nfe % 3 == 0 else [3] * (steps - 1) + [nfe % 3]
        for i, order in enumerate(orders):
            t, t_next = ts[i], ts[i + 1]
            t_target, sigma_up = self._ancestral_target(t, t_next, t_end, eta)
            eps, cache = self.eps({}, "eps", x, t)
            if self.info_callback is not None:
                self.info_callback({"x": x, "i": i, "t": t, "t_up": t, "denoised": x - self.sigma(t) * eps})
            x, _ = self._step(order, x, t, t_target, cache)
            if eta:
                x = x + sigma_up * s_noise * noise_sampler(self.sigma(t), self.sigma(t_next))
        return x

    def dpm_solver_adaptive(self, x: torch.Tensor, t_start: torch.Tensor, t_end: torch.Tensor, order: int = 3,
                            rtol: float = 0.05, atol: float = 0.0078, h_init: float = 0.05, pcoeff: float = 0.0,
                            icoeff: float = 1.0, dcoeff: float = 0.0, accept_safety: float = 0.81, eta: float = 0.0,
                            s_noise: float = 1.0,
                            noise_sampler: NoiseSampler | None = None) -> tuple[torch.Tensor, dict[str, int]]:
        """Adaptive DPM-Solver-12 or -23 (section 4 of the paper): each step compares an order-1/2 (or 2/3) solution
        with the next order up, sharing evaluations, and a PID controller sizes the next step from their scaled
        difference. Returns x and {"steps", "nfe", "n_accept", "n_reject"}."""
        if order not in (2, 3):
            raise ValueError(f"order must be 2 or 3, got {order}")
        forward = t_end > t_start
        if not forward and eta:
            raise ValueError("eta must be 0 for reverse sampling (t_end below t_start)")
        noise_sampler = default_noise_sampler(x) if noise_sampler is None else noise_sampler
        h_init = abs(h_init) * (1 if forward else -1)
        atol, rtol = torch.tensor(atol), torch.tensor(rtol)
        s, x_prev = t_start, x
        pid = PIDStepSizeController(h_init, pcoeff, icoeff, dcoeff, 1.5 if eta else order, accept_safety)
        info = {"steps": 0, "nfe": 0, "n_accept": 0, "n_reject": 0}
        while s < t_end - 1e-5 if forward else s > t_end + 1e-5:
            t = torch.minimum(t_end, s + pid.h) if forward else torch.maximum(t_end, s + pid.h)
            t_target, sigma_up = self._ancestral_target(s, t, t_end, eta)
            eps, cache = self.eps({}, "eps", x, s)
            denoised = x - self.sigma(s) * eps
            if order == 2:
                x_low, cache = self.dpm_solver_1_step(x, s, t_target, eps_cache=cache)
                x_high, cache = self.dpm_solver_2_step(x, s, t_target, eps_cache=cache)
            else:
                x_low, cache = self.dpm_solver_2_step(x, s, t_target, r1=1 / 3, eps_cache=cache)
                x_high, cache = self.dpm_solver_3_step(x, s, t_target, eps_cache=cache)
            delta = torch.maximum(atol, rtol * torch.maximum(x_low.abs(), x_prev.abs()))
            error = torch.linalg.norm((x_low - x_high) / delta) / x.numel() ** 0.5
            if pid.propose_step(error):
                x_prev = x_low
                x = x_high
                if eta:
                    x = x + sigma_up * s_noise * noise_sampler(self.sigma(s), self.sigma(t))
                s = t
                info["n_accept"] += 1
            else:
                info["n_reject"] += 1
            info["nfe"] += order
            info["steps"] += 1
            if self.info_callback is not None:
                self.info_callback({"x": x, "i": info["steps"] - 1, "t": s, "t_up": s, "denoised": denoised,
                                    "error": error, "h": pid.h, **info})
        return x, info


def _check_range(sigma_min: float | torch.Tensor, sigma_max: float | torch.Tensor) -> None:
    if sigma_min <= 0 or sigma_max <= 0:
        raise ValueError(f"sigma_min and sigma_max must be above 0 (DPM-Solver stops short of sigma 0), got "
                         f"{float(sigma_min)} and {float(sigma_max)}")


def _as_time(solver: DPMSolver, sigma: float | torch.Tensor) -> torch.Tensor:
    sigma = sigma.detach().clone() if torch.is_tensor(sigma) else torch.tensor(sigma)
    return solver.t(sigma)


def _sigma_callback(solver: DPMSolver, callback: Callback | None) -> Callback | None:
    if callback is None:
        return None
    return lambda info: callback({"sigma": solver.sigma(info["t"]), "sigma_hat": solver.sigma(info["t_up"]), **info})


@torch.no_grad()
def sample_dpm_fast(model: Callable[..., torch.Tensor], x: torch.Tensor, sigma_min: float | torch.Tensor,
                    sigma_max: float | torch.Tensor, n: int, extra_args: dict | None = None,
                    callback: Callback | None = None, disable: bool | None = None, eta: float = 0.0,
                    s_noise: float = 1.0, noise_sampler: NoiseSampler | None = None) -> torch.Tensor:
    """DPM-Solver-fast with `n` model evaluations from sigma_max down to sigma_min (Lu et al. 2022)."""
    _check_range(sigma_min, sigma_max)
    with tqdm(total=n, disable=disable) as progress:
        solver = DPMSolver(model, extra_args, eps_callback=progress.update)
        solver.info_callback = _sigma_callback(solver, callback)
        return solver.dpm_solver_fast(x, _as_time(solver, sigma_max), _as_time(solver, sigma_min), n, eta, s_noise,
                                      noise_sampler)


@torch.no_grad()
def sample_dpm_adaptive(model: Callable[..., torch.Tensor], x: torch.Tensor, sigma_min: float | torch.Tensor,
                        sigma_max: float | torch.Tensor, extra_args: dict | None = None,
                        callback: Callback | None = None, disable: bool | None = None, order: int = 3,
                        rtol: float = 0.05, atol: float = 0.0078, h_init: float = 0.05, pcoeff: float = 0.0,
                        icoeff: float = 1.0, dcoeff: float = 0.0, accept_safety: float = 0.81, eta: float = 0.0,
                        s_noise: float = 1.0, noise_sampler: NoiseSampler | None = None,
                        return_info: bool = False) -> torch.Tensor | tuple[torch.Tensor, dict[str, int]]:
    """Adaptive DPM-Solver-12 / -23 from sigma_max down to sigma_min (Lu et al. 2022); the step count follows from
    the tolerances `rtol` and `atol`."""
    _check_range(sigma_min, sigma_max)
    with tqdm(disable=disable) as progress:
        solver = DPMSolver(model, extra_args, eps_callback=progress.update)
        solver.info_callback = _sigma_callback(solver, callback)
        x, info = solver.dpm_solver_adaptive(x, _as_time(solver, sigma_max), _as_time(solver, sigma_min), order,
                                             rtol, atol, h_init, pcoeff, icoeff, dcoeff, accept_safety, eta, s_noise,
                                             noise_sampler)
    return (x, info) if return_info else x
