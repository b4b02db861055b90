"""k-diffusion samplers against diffusers' schedulers on the same toy model, conditioning and starting noise.

How the schedules are made equal:
- k-diffusion's `get_sigmas(n)` (t = linspace(T-1, 0, n), log-sigma interpolation) equals the Euler / Heun / DPM2 /
  LMS / DPM++ SDE schedulers' `timestep_spacing="linspace"` (with `interpolation_type="linear"`, the default) when
  every t is an integer, as for n = 10 (999 / 9 = 111): diffusers interpolates sigma linearly and k-diffusion log
  sigma, which only agree on integer t. The tests assert the schedules equal before comparing samplers.
- Karras sigmas (`use_karras_sigmas=True`) are the same formula over the same [sigma(0), sigma(T-1)] range.
- diffusers' multistep schedulers (DPMSolverMultistep, UniPC) space n integer timesteps round(linspace(0, T-1,
  n + 1))[::-1][:-1]; that is `get_sigmas_discrete(n)`, fed to the k-diffusion samplers here.
- Timesteps given to the model: diffusers passes fractional t = sigma_to_t(sigma) (log-sigma interpolation) to
  Euler / Heun / LMS / DPM2 / DPM++ SDE, which is `quantize=False` (the default); DPMSolverMultistep and UniPC round
  the Karras timesteps, which is `quantize=True`. KDPM2 rounds its Karras first-stage timesteps but not its midpoint ones, a
  mix k-diffusion has no switch for: there the model ignores t, so only the samplers are compared.
- diffusers' multistep schedulers work in x_t = x / sqrt(sigma^2 + 1) space; their start is converted from ours.
- EulerAncestralDiscreteScheduler has no Karras option: it is given EulerDiscreteScheduler's Karras sigmas/timesteps.
- Noise: diffusers draws step noise from a list of per-image generators, which continues ImageNoise's per-image
  streams draw for draw; DPMSolverSDEScheduler draws from a torchsde Brownian tree of the seed it is given, as our
  `BrownianTreeNoiseSampler` does with the same seed.
- The LMS scheduler's scipy quadrature is replaced by exact polynomial integration (numpy).
"""
from __future__ import annotations

import types

import numpy as np
import pytest
import torch

from ldm.models.diffusion import k_sampling
from ldm.models.diffusion.k_denoisers import CompVisDenoiser, CompVisVDenoiser
from ldm.models.diffusion.k_schedules import get_ancestral_step, get_sigmas_karras
from ldm.models.diffusion.noise import ImageNoise
from ldm.models.diffusion.samplers import available_samplers, resolve_sampler, sample
from toy_diffusion import ContinuousGaussianData, GaussianDataDiffusion, NonlinearToyDiffusion

diffusers = pytest.importorskip("diffusers")

BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SHAPE = (2, 4, 8, 8)
SEEDS = [11, 12]
SCALE = 5.0
STEPS = 10  # 999 / (STEPS - 1) is an integer, so the linspace timesteps are integers


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def conditioning(batch: int = SHAPE[0]) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(batch, 3, 8, generator=g), torch.randn(batch, 3, 8, generator=g) * 0.1


class TimeBlindToy(NonlinearToyDiffusion):
    """The nonlinear toy with the timestep input ignored."""

    def apply_model(self, x, t, cond):
        return super().apply_model(x, torch.zeros_like(t), cond)


def diffusers_loop(scheduler, toy, x, cond, uncond, scale=SCALE, **step_kwargs) -> torch.Tensor:
    """The diffusers pipeline loop: scale the input, guided model output at the scheduler's timestep, step."""
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t)
        timesteps = t.expand(x.shape[0])
        out_uncond = toy.apply_model(model_input, timesteps, uncond)
        out_cond = toy.apply_model(model_input, timesteps, cond)
        x = scheduler.step(out_uncond + scale * (out_cond - out_uncond), t, x, **step_kwargs).prev_sample
    return x


def run_ours(sampler, toy, sigmas, quantize, seeds=SEEDS, denoiser_cls=CompVisDenoiser, **knobs):
    cond, uncond = conditioning()
    noise = ImageNoise(seeds)
    x = noise.randn(SHAPE) * sigmas[0]
    denoiser = denoiser_cls(toy, quantize=quantize)
    extra_args = {"cond": cond, "uncond": uncond, "cond_scale": SCALE}
    return sampler(denoiser, x, sigmas, extra_args=extra_args, disable=True, noise_sampler=noise.noise_sampler(x),
                   **knobs)


def run_diffusers(scheduler, toy, sigmas, seeds=SEEDS, vp=False, with_generator=False):
    """diffusers from the same start as `run_ours`; `vp` for schedulers working in x / sqrt(sigma^2 + 1)."""
    cond, uncond = conditioning()
    noise = ImageNoise(seeds)
    x = noise.randn(SHAPE) * sigmas[0]
    if vp:
        x = x / (sigmas[0] ** 2 + 1) ** 0.5
    kwargs = {"generator": noise.generators} if with_generator else {}
    return diffusers_loop(scheduler, toy, x, cond, uncond, **kwargs)


def our_sigmas(toy, karras: bool, n: int = STEPS) -> torch.Tensor:
    denoiser = CompVisDenoiser(toy)
    if karras:
        return get_sigmas_karras(n, denoiser.sigma_min, denoiser.sigma_max)
    return denoiser.get_sigmas(n)


def assert_same_schedule(scheduler_sigmas: torch.Tensor, sigmas: torch.Tensor) -> None:
    torch.testing.assert_close(scheduler_sigmas.float(), sigmas, rtol=2e-6, atol=1e-7)


def assert_same_latents(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Equal to float32 rounding: the two accumulate it differently over the steps, from starting latents ~40 in
    size. Measured: at most 2e-6 of the largest latent; a sampler off by one quantized timestep is 1.6e-4 off."""
    scale = float(theirs.abs().max())
    assert scale > 0.1  # a real sample, not a collapsed one
    torch.testing.assert_close(ours, theirs.float(), rtol=0, atol=5e-6 * scale)


# --- deterministic single-eval samplers ------------------------------------------------------------------------------
@pytest.mark.parametrize("karras", [False, True])
def test_euler_matches_diffusers(karras):
    toy = NonlinearToyDiffusion()
    scheduler = diffusers.EulerDiscreteScheduler(**BETAS, timestep_spacing="linspace", use_karras_sigmas=karras)
    scheduler.set_timesteps(STEPS)
    sigmas = our_sigmas(toy, karras)
    assert_same_schedule(scheduler.sigmas, sigmas)
    assert_same_latents(run_ours(k_sampling.sample_euler, toy, sigmas, quantize=False),
                        run_diffusers(scheduler, toy, sigmas))


def test_euler_v_prediction_matches_diffusers():
    toy = NonlinearToyDiffusion(parameterization="v")
    scheduler = diffusers.EulerDiscreteScheduler(**BETAS, timestep_spacing="linspace", prediction_type="v_prediction")
    scheduler.set_timesteps(STEPS)
    sigmas = our_sigmas(toy, karras=False)
    ours = run_ours(k_sampling.sample_euler, toy, sigmas, quantize=True, denoiser_cls=CompVisVDenoiser)
    assert_same_latents(ours, run_diffusers(scheduler, toy, sigmas))


@pytest.mark.parametrize("karras", [False, True])
def test_heun_matches_diffusers(karras):
    toy = NonlinearToyDiffusion()
    scheduler = diffusers.HeunDiscreteScheduler(**BETAS, timestep_spacing="linspace", use_karras_sigmas=karras)
    scheduler.set_timesteps(STEPS)
    sigmas = our_sigmas(toy, karras)
    assert_same_schedule(torch.cat([scheduler.sigmas[:1], scheduler.sigmas[1::2]]), sigmas)  # inner ones listed twice
    assert_same_latents(run_ours(k_sampling.sample_heun, toy, sigmas, quantize=False),
                        run_diffusers(scheduler, toy, sigmas))


@pytest.mark.parametrize("karras", [False, True])
def test_dpm2_matches_diffusers(karras):
    toy = TimeBlindToy() if karras else NonlinearToyDiffusion()
    scheduler = diffusers.KDPM2DiscreteScheduler(**BETAS, timestep_spacing="linspace", use_karras_sigmas=karras)
    scheduler.set_timesteps(STEPS)
    sigmas = our_sigmas(toy, karras)
    assert_same_latents(run_ours(k_sampling.sample_dpm_2, toy, sigmas, quantize=False),
                        run_diffusers(scheduler, toy, sigmas))


def exact_polynomial_quad(function, start, end, **_):
    """scipy.integrate.quad's stand-in for diffusers' LMS: the integrand is a Lagrange basis polynomial, so
    recover its coefficients by fitting it at a few points and integrate the polynomial exactly."""
    points = np.linspace(start, end, 6)
    polynomial = np.polynomial.Polynomial.fit(points, [function(p) for p in points], deg=5).convert()
    antiderivative = polynomial.integ()
    return float(antiderivative(end) - antiderivative(start)), 0.0


@pytest.mark.parametrize("karras", [False, True])
def test_lms_matches_diffusers(karras, monkeypatch):
    from diffusers.schedulers import scheduling_lms_discrete  # the module: the top-level name wants scipy

    monkeypatch.setattr(scheduling_lms_discrete, "integrate", types.SimpleNamespace(quad=exact_polynomial_quad),
                        raising=False)
    toy = NonlinearToyDiffusion()
    scheduler = scheduling_lms_discrete.LMSDiscreteScheduler(**BETAS, timestep_spacing="linspace",
                                                             use_karras_sigmas=karras)
    scheduler.set_timesteps(STEPS)
    sigmas = our_sigmas(toy, karras)
    assert_same_schedule(scheduler.sigmas, sigmas)
    assert_same_latents(run_ours(k_sampling.sample_lms, toy, sigmas, quantize=False),
                        run_diffusers(scheduler, toy, sigmas))


def test_lms_coefficients_integrate_the_lagrange_basis():
    sigmas = np.array([14.6, 6.0, 2.5, 1.1, 0.4, 0.0])
    for order in (1, 2, 3, 4):
        i = order - 1 + 1
        for j in range(order):
            basis = lambda tau: np.prod([(tau - sigmas[i - k]) / (sigmas[i - j] - sigmas[i - k])  # noqa: E731
                                         for k in range(order) if k != j])
            expected, _ = exact_polynomial_quad(basis, sigmas[i], sigmas[i + 1])
            assert k_sampling.linear_multistep_coeff(order, sigmas, i, j) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("karras", [False, True])
def test_dpmpp_2m_matches_diffusers(karras):
    toy = NonlinearToyDiffusion()
    scheduler = diffusers.DPMSolverMultistepScheduler(**BETAS, algorithm_type="dpmsolver++", solver_order=2,
                                                      use_karras_sigmas=karras)
    scheduler.set_timesteps(STEPS)
    denoiser = CompVisDenoiser(toy)
    sigmas = our_sigmas(toy, karras=True) if karras else denoiser.get_sigmas_discrete(STEPS)
    assert_same_schedule(scheduler.sigmas, sigmas)
    assert_same_latents(run_ours(k_sampling.sample_dpmpp_2m, toy, sigmas, quantize=True),
                        run_diffusers(scheduler, toy, sigmas, vp=True))


# --- stochastic samplers: diffusers draws from per-image generators, ImageNoise's streams ---------------------------
@pytest.mark.parametrize("karras", [False, True])
def test_euler_ancestral_matches_diffusers(karras):
    toy = NonlinearToyDiffusion()
    scheduler = diffusers.EulerAncestralDiscreteScheduler(**BETAS, timestep_spacing="linspace")
    scheduler.set_timesteps(STEPS)
    if karras:  # this scheduler has no Karras option: give it the Euler scheduler's Karras sigmas and timesteps
        karras_source = diffusers.EulerDiscreteScheduler(**BETAS, use_karras_sigmas=True)
        karras_source.set_timesteps(STEPS)
        scheduler.sigmas, scheduler.timesteps = karras_source.sigmas, karras_source.timesteps
    sigmas = our_sigmas(toy, karras)
    assert_same_schedule(scheduler.sigmas, sigmas)
    ours = run_ours(k_sampling.sample_euler_ancestral, toy, sigmas, quantize=False)
    assert_same_latents(ours, run_diffusers(scheduler, toy, sigmas, with_generator=True))
    deterministic = run_ours(k_sampling.sample_euler, toy, sigmas, quantize=False)
    assert (ours - deterministic).abs().mean() > 0.05  # the noise really entered


@pytest.mark.parametrize("karras", [False, True])
def test_dpm2_ancestral_matches_diffusers(karras):
    toy = TimeBlindToy() if karras else NonlinearToyDiffusion()
    scheduler = diffusers.KDPM2AncestralDiscreteScheduler(**BETAS, timestep_spacing="linspace",
                                                          use_karras_sigmas=karras)
    scheduler.set_timesteps(STEPS)
    sigmas = our_sigmas(toy, karras)
    assert_same_latents(run_ours(k_sampling.sample_dpm_2_ancestral, toy, sigmas, quantize=False),
                        run_diffusers(scheduler, toy, sigmas, with_generator=True))


@pytest.mark.parametrize("karras", [False, True])
def test_dpmpp_2m_sde_matches_diffusers(karras):
    """k-diffusion's DPM++ 2M SDE with eta=1 and the midpoint solver is diffusers' sde-dpmsolver++ (order 2)."""
    toy = NonlinearToyDiffusion()
    scheduler = diffusers.DPMSolverMultistepScheduler(**BETAS, algorithm_type="sde-dpmsolver++", solver_order=2,
                                                      use_karras_sigmas=karras)
    scheduler.set_timesteps(STEPS)
    sigmas = our_sigmas(toy, karras=True) if karras else CompVisDenoiser(toy).get_sigmas_discrete(STEPS)
    assert_same_schedule(scheduler.sigmas, sigmas)
    assert_same_latents(run_ours(k_sampling.sample_dpmpp_2m_sde, toy, sigmas, quantize=True),
                        run_diffusers(scheduler, toy, sigmas, vp=True, with_generator=True))


@pytest.mark.parametrize("karras", [False, True])
def test_dpmpp_sde_matches_diffusers_with_the_same_noise(karras):
    """Same update formulas as diffusers' DPMSolverSDEScheduler given the same noise: our run's Brownian-tree draws,
    replayed to diffusers in the order they were made. (A tree queried at the other's times would not do: diffusers
    computes its midpoints in another order, and a tree's values move by about sqrt(1e-6) when a query time moves by
    one float32 rounding step past its 1e-6 grid. test_new_samplers.py compares our trees with k-diffusion's.)"""
    from diffusers.schedulers.scheduling_dpmsolver_sde import DPMSolverSDEScheduler

    toy = NonlinearToyDiffusion()
    scheduler = DPMSolverSDEScheduler(**BETAS, timestep_spacing="linspace", use_karras_sigmas=karras)
    scheduler.set_timesteps(STEPS)
    sigmas = our_sigmas(toy, karras)
    assert_same_schedule(torch.cat([scheduler.sigmas[:1], scheduler.sigmas[1::2]]), sigmas)
    cond, uncond = conditioning()
    x = ImageNoise(SEEDS).randn(SHAPE) * sigmas[0]
    tree = k_sampling.BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=SEEDS)
    draws = []

    def recording(sigma, sigma_next):
        draws.append(tree(sigma, sigma_next))
        return draws[-1]

    ours = k_sampling.sample_dpmpp_sde(CompVisDenoiser(toy), x, sigmas, disable=True, noise_sampler=recording,
                                       extra_args={"cond": cond, "uncond": uncond, "cond_scale": SCALE})
    replay = iter(draws)
    scheduler.noise_sampler = lambda sigma, sigma_next: next(replay)
    assert_same_latents(ours, diffusers_loop(scheduler, toy, x, cond, uncond))
    assert next(replay, None) is None and len(draws) == 2 * (STEPS - 1)


# --- dpmpp_2s_ancestral has no diffusers counterpart ------------------------------------------------------------------
def test_dpmpp_2s_ancestral_without_noise_is_the_single_step_solver():
    """With eta=0 DPM++ 2S a is DPM-Solver++(2S): one log-sigma midpoint evaluation per step, checked by hand."""
    toy = NonlinearToyDiffusion()
    cond, uncond = conditioning()
    denoiser = CompVisDenoiser(toy, quantize=False)
    args = {"cond": cond, "uncond": uncond, "cond_scale": SCALE}
    sigmas = our_sigmas(toy, karras=True, n=4)
    x0 = ImageNoise(SEEDS).randn(SHAPE) * sigmas[0]
    x = x0.clone()
    for sigma, sigma_next in zip(sigmas[:-2], sigmas[1:-1]):
        ones = torch.ones(SHAPE[0])
        denoised = denoiser(x, sigma * ones, **args)
        sigma_mid = (sigma * sigma_next).sqrt()
        x_mid = sigma_mid / sigma * x + (1 - sigma_mid / sigma) * denoised  # expm1(-h/2) = sigma_mid/sigma - 1
        x = sigma_next / sigma * x + (1 - sigma_next / sigma) * denoiser(x_mid, sigma_mid * ones, **args)
    x = denoiser(x, sigmas[-2] * torch.ones(SHAPE[0]), **args)  # Euler to sigma 0 lands on the denoised estimate
    ours = k_sampling.sample_dpmpp_2s_ancestral(denoiser, x0, sigmas, extra_args=args, disable=True, eta=0.0)
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)


def test_ancestral_step_splits_the_variance():
    sigma_down, sigma_up = get_ancestral_step(torch.tensor(3.0), torch.tensor(1.0))
    assert float(sigma_down**2 + sigma_up**2) == pytest.approx(1.0)
    assert float(sigma_up) == pytest.approx((1.0 * (9.0 - 1.0) / 9.0) ** 0.5)  # DDPM posterior std, eta = 1
    assert get_ancestral_step(torch.tensor(3.0), torch.tensor(1.0), eta=0.0)[1] == 0


def test_no_noise_sampler_means_what_it_means_in_k_diffusion():
    """Without a noise sampler the ancestral samplers draw from torch's global generator and the SDE samplers from a
    Brownian tree seeded from it: the same global seed, the same latents."""
    toy = GaussianDataDiffusion()
    denoiser = CompVisDenoiser(toy)
    sigmas = denoiser.get_sigmas(4)
    x = torch.ones(SHAPE) * sigmas[0]
    for sampler in (k_sampling.sample_euler_ancestral, k_sampling.sample_dpmpp_2m_sde):
        torch.manual_seed(0)
        first = sampler(denoiser, x, sigmas, disable=True)
        torch.manual_seed(0)
        assert torch.equal(sampler(denoiser, x, sigmas, disable=True), first)
        assert not torch.equal(sampler(denoiser, x, sigmas, disable=True), first)


# --- convergence to the exact probability-flow ODE solution ---------------------------------------------------------


def ode_errors(sampler, step_counts, **knobs) -> list[float]:
    """Max error at sigma_min (t=0) against the exact ODE solution x = m + (x_T - m) sqrt((s^2 + sigma^2) /
    (s^2 + sigma_T^2)) for data N(m, s^2), in float64."""
    toy = ContinuousGaussianData().double()
    cond = torch.tensor([0.3, -0.4], dtype=torch.float64)
    denoiser = CompVisDenoiser(toy, quantize=False)
    errors = []
    for steps in step_counts:
        # Karras sigmas over the model's range, stopping at sigma(t=0) > 0 where the exact answer is finite. (On the
        # model's own linear-t schedule the last log-sigma step stays large, which keeps the log-sigma solvers
        # out of their asymptotic regime until hundreds of steps.)
        sigmas = get_sigmas_karras(steps + 1, denoiser.sigma_min, denoiser.sigma_max, dtype=torch.float64)[:-1]
        x = ImageNoise(SEEDS).randn(SHAPE, dtype=torch.float64) * sigmas[0]
        out = sampler(denoiser, x, sigmas, extra_args={"cond": cond}, disable=True, **knobs)
        mean = toy.mu + cond.reshape(-1, 1, 1, 1)
        exact = mean + (x - mean) * ((toy.std**2 + sigmas[-1] ** 2) / (toy.std**2 + sigmas[0] ** 2)) ** 0.5
        errors.append(float((out - exact).abs().max()))
    return errors


def measured_orders(errors: list[float], step_counts: list[int]) -> list[float]:
    return [float(np.log(e0 / e1) / np.log(n1 / n0))
            for e0, e1, n0, n1 in zip(errors, errors[1:], step_counts, step_counts[1:])]


@pytest.mark.parametrize("sampler, knobs, order", [
    (k_sampling.sample_euler, {}, 1),
    (k_sampling.sample_heun, {}, 2),
    (k_sampling.sample_dpm_2, {}, 2),
    (k_sampling.sample_dpmpp_2m, {}, 2),
    (k_sampling.sample_lms, {}, 3.3),  # fourth order asymptotically; the first steps are lower order
    (k_sampling.sample_dpmpp_2s_ancestral, {"eta": 0.0}, 2),
    (k_sampling.sample_dpmpp_sde, {"eta": 0.0}, 2),
])
def test_deterministic_samplers_converge_at_their_order(sampler, knobs, order):
    step_counts = [20, 40, 80]
    errors = ode_errors(sampler, step_counts, **knobs)
    orders = measured_orders(errors, step_counts)
    assert errors[-1] < 0.04
    assert min(orders) > order - 0.2, (errors, orders)


# --- stochastic samplers sample the data distribution ---------------------------------------------------------------
@pytest.mark.parametrize("sampler, steps, std_tolerance", [
    (k_sampling.sample_euler_ancestral, 100, 0.025),  # measured std 0.482
    (k_sampling.sample_dpm_2_ancestral, 100, 0.01),  # 0.500
    (k_sampling.sample_dpmpp_2s_ancestral, 100, 0.01),  # 0.499
    (k_sampling.sample_dpmpp_2m_sde, 100, 0.01),  # 0.501
    (k_sampling.sample_dpmpp_sde, 30, 0.01),  # 0.496; 0.452 with independent instead of Brownian draws
])
def test_stochastic_samplers_sample_the_data_distribution(sampler, steps, std_tolerance):
    """Data N(3, 0.5^2): the noise these samplers add forgets the start's mismatch with the true marginal, so the
    samples have mean 3 (the deterministic ODE from x_T * sigma_max ends near 2.90) and std 0.5. The SDE samplers
    draw from one Brownian tree per image."""
    toy = ContinuousGaussianData(mu=3.0)
    denoiser = CompVisDenoiser(toy, quantize=False)
    sigmas = get_sigmas_karras(steps, denoiser.sigma_min, denoiser.sigma_max)
    noise = ImageNoise(list(range(4)))
    x = noise.randn((4, 4, 32, 32)) * sigmas[0]
    noise_sampler = noise.noise_sampler(x)
    if sampler in (k_sampling.sample_dpmpp_sde, k_sampling.sample_dpmpp_2m_sde):
        noise_sampler = k_sampling.BrownianTreeNoiseSampler(x, sigmas[-2], sigmas[0], seed=noise.seeds)
    out = sampler(denoiser, x, sigmas, extra_args={"cond": torch.zeros(4)}, disable=True,
                  noise_sampler=noise_sampler)
    assert abs(float(out.mean()) - 3.0) < 0.015
    assert abs(float(out.std()) - 0.5) < std_tolerance


# --- the entry point: registry, schedules, guidance and noise wired together -----------------------------------------
def test_entry_point_euler_matches_diffusers_pipeline_loop():
    toy = NonlinearToyDiffusion()
    cond, uncond = conditioning()
    ours = sample(toy, "Euler", STEPS, SHAPE, cond, uncond, SCALE, ImageNoise(SEEDS), disable=True)
    scheduler = diffusers.EulerDiscreteScheduler(**BETAS, timestep_spacing="linspace")
    scheduler.set_timesteps(STEPS)
    x = ImageNoise(SEEDS).randn(SHAPE) * scheduler.init_noise_sigma
    assert_same_latents(ours, diffusers_loop(scheduler, toy, x, cond, uncond))


def test_entry_point_v_model_euler_matches_diffusers():
    toy = NonlinearToyDiffusion(parameterization="v")
    cond, uncond = conditioning()
    ours = sample(toy, "euler", STEPS, SHAPE, cond, uncond, SCALE, ImageNoise(SEEDS), disable=True)
    scheduler = diffusers.EulerDiscreteScheduler(**BETAS, timestep_spacing="linspace", prediction_type="v_prediction")
    scheduler.set_timesteps(STEPS)
    x = ImageNoise(SEEDS).randn(SHAPE) * scheduler.init_noise_sigma
    assert_same_latents(ours, diffusers_loop(scheduler, toy, x, cond, uncond))


def test_entry_point_dpmpp_2m_karras_matches_diffusers():
    """diffusers starts this scheduler from unit-variance x_t (x = x_T sqrt(sigma_max^2 + 1)), k-diffusion from
    x = x_T sigma_max: the start is converted so that only the sampling is compared."""
    toy = NonlinearToyDiffusion()
    cond, uncond = conditioning()
    ours = sample(toy, "DPM++ 2M Karras", STEPS, SHAPE, cond, uncond, SCALE, ImageNoise(SEEDS), disable=True,
                  quantize=True)  # diffusers rounds the Karras timesteps
    scheduler = diffusers.DPMSolverMultistepScheduler(**BETAS, use_karras_sigmas=True)
    scheduler.set_timesteps(STEPS)
    sigma_max = scheduler.sigmas[0]
    x = ImageNoise(SEEDS).randn(SHAPE) * sigma_max / (sigma_max**2 + 1) ** 0.5
    assert_same_latents(ours, diffusers_loop(scheduler, toy, x, cond, uncond))


@pytest.mark.parametrize("name", ["euler", "euler_a", "dpmpp_sde_karras"])
def test_image_depends_only_on_its_seed(name):
    """Image k of a batch of 4 equals image k sampled alone with the same seed, for deterministic and stochastic
    samplers alike: every draw comes from that image's own generator."""
    toy = NonlinearToyDiffusion()
    cond, uncond = conditioning(batch=4)
    batch = sample(toy, name, 6, (4, *SHAPE[1:]), cond, uncond, SCALE, ImageNoise.from_seed(100, 4), disable=True)
    for k in range(4):
        alone = sample(toy, name, 6, (1, *SHAPE[1:]), cond[k:k + 1], uncond[k:k + 1], SCALE, ImageNoise([100 + k]),
                       disable=True)
        torch.testing.assert_close(batch[k:k + 1], alone, rtol=1e-5, atol=1e-5)
    assert (batch[0] - batch[1]).abs().mean() > 0.1  # different seeds, different images


def test_entry_point_uses_eta_and_the_callback():
    toy = NonlinearToyDiffusion()
    cond, uncond = conditioning()
    steps = []
    with_noise = sample(toy, "euler_a", 5, SHAPE, cond, uncond, SCALE, ImageNoise(SEEDS), disable=True,
                        callback=lambda info: steps.append((info["i"], info["denoised"].shape)))
    without_noise = sample(toy, "euler_a", 5, SHAPE, cond, uncond, SCALE, ImageNoise(SEEDS), eta=0.0, disable=True)
    assert steps == [(i, torch.Size(SHAPE)) for i in range(5)]
    # eta = 0 turns the ancestral step into a DDIM-like deterministic step: same schedule, same start, no noise
    assert (with_noise - without_noise).abs().mean() > 0.05
    with pytest.raises(ValueError, match="takes no eta"):
        sample(toy, "heun", 5, SHAPE, cond, uncond, SCALE, ImageNoise(SEEDS), eta=0.5)
    with pytest.raises(ValueError, match="batch = 2"):
        sample(toy, "heun", 5, (3, 4, 8, 8), cond, uncond, SCALE, ImageNoise(SEEDS))


def test_entry_point_dispatches_compvis_samplers():
    """"ddim" runs the CompVis DDIMSampler with the same x_T, eta, guidance and per-image noise."""
    from ldm.models.diffusion.ddim import DDIMSampler

    toy = NonlinearToyDiffusion()
    cond, uncond = conditioning()
    seen = []
    ours = sample(toy, "DDIM", 5, SHAPE, cond, uncond, SCALE, ImageNoise(SEEDS), eta=0.5, disable=True,
                  callback=lambda info: seen.append(info["i"]))
    direct, _ = DDIMSampler(toy).sample(S=5, batch_size=SHAPE[0], shape=SHAPE[1:], conditioning=cond, eta=0.5,
                                        unconditional_guidance_scale=SCALE, unconditional_conditioning=uncond,
                                        noise=ImageNoise(SEEDS), verbose=False)
    torch.testing.assert_close(ours, direct)
    assert seen == list(range(5))  # 5 steps: 1000 // 5 divides evenly (CompVis takes 7 steps for S=6)


# --- the name registry -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name, canonical, schedule", [
    ("Euler", "euler", "model"),
    ("Euler a", "euler_a", "model"),
    ("euler_ancestral", "euler_a", "model"),
    ("EULER-A", "euler_a", "model"),
    ("k_euler_a", "euler_a", "model"),
    ("Heun", "heun", "model"),
    ("DPM2", "dpm2", "model"),
    ("DPM2 a", "dpm2_a", "model"),
    ("DPM2 a Karras", "dpm2_a_karras", "karras"),
    ("LMS", "lms", "model"),
    ("LMS Karras", "lms_karras", "karras"),
    ("DPM++ 2S a", "dpmpp_2s_a", "model"),
    ("DPM++ 2M", "dpmpp_2m", "model"),
    ("DPM++ 2M Karras", "dpmpp_2m_karras", "karras"),
    ("dpmpp_2m_karras", "dpmpp_2m_karras", "karras"),
    ("DPM++ SDE Karras", "dpmpp_sde_karras", "karras"),
    ("DPM++ 2M SDE", "dpmpp_2m_sde", "model"),
    ("UniPC", "unipc", "discrete"),
    ("uni_pc", "unipc", "discrete"),
    ("DPM++ 2M SDE Heun", "dpmpp_2m_sde_heun", "model"),
    ("k_dpmpp_2m_sde_heun", "dpmpp_2m_sde_heun", "model"),
    ("DPM++ 2M SDE Heun Karras", "dpmpp_2m_sde_heun_karras", "karras"),
    ("DPM++ 3M SDE", "dpmpp_3m_sde", "model"),
    ("DPM fast", "dpm_fast", "model"),
    ("DPM adaptive", "dpm_adaptive", "model"),
    ("k_dpm_ad", "dpm_adaptive", "model"),
    ("Restart", "restart", "model"),
    ("LCM", "lcm", "model"),
    ("k_lcm", "lcm", "model"),
    ("Euler CFG++", "euler_cfg_pp", "model"),
    ("Euler Ancestral CFG++", "euler_ancestral_cfg_pp", "model"),
])
def test_sampler_names_resolve(name, canonical, schedule):
    spec = resolve_sampler(name)
    assert (spec.name, spec.schedule, spec.compvis) == (canonical, schedule, None)
    assert spec.name in available_samplers()


def test_karras_variants_share_the_sampler_function():
    assert resolve_sampler("DPM++ 2M Karras").function is k_sampling.sample_dpmpp_2m
    assert resolve_sampler("Euler a Karras").function is k_sampling.sample_euler_ancestral
    assert resolve_sampler("dpmpp_sde").stochastic and not resolve_sampler("dpmpp_2m").stochastic


@pytest.mark.parametrize("name, target", [("ddim", "ldm.models.diffusion.ddim:DDIMSampler"),
                                          ("PLMS", "ldm.models.diffusion.plms:PLMSSampler"),
                                          ("DPM-Solver", "ldm.models.diffusion.dpm_solver:DPMSolverSampler")])
def test_compvis_sampler_names_resolve(name, target):
    assert resolve_sampler(name).compvis == target


@pytest.mark.parametrize("name", ["eulerr", "ddim karras", "dpm++ 3m", "lcm karras", ""])
def test_unknown_sampler_names_list_the_choices(name):
    with pytest.raises(ValueError) as error:
        resolve_sampler(name)
    message = str(error.value)
    assert repr(name) in message
    for choice in ("euler_a", "dpmpp_2m_karras", "unipc", "ddim", "plms", "dpm_solver"):
        assert choice in message


def test_available_samplers_lists_every_family():
    names = available_samplers()
    base = ["euler", "euler_a", "heun", "dpm2", "dpm2_a", "lms", "dpmpp_2s_a", "dpmpp_2m", "dpmpp_sde",
            "dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde", "unipc", "dpm_fast", "dpm_adaptive", "restart", "lcm",
            "euler_cfg_pp", "euler_ancestral_cfg_pp"]
    karras = [name for name in base if name not in ("dpm_fast", "dpm_adaptive", "lcm")]
    assert names == base + [f"{name}_karras" for name in karras] + ["ddim", "plms", "dpm_solver", "ddim_cfg_pp"]


@pytest.mark.parametrize("name, uses_ensd, brownian, discard, automatic", [
    ("DPM++ 2M", False, False, False, "karras"),
    ("DPM++ SDE", False, True, False, "karras"),
    ("DPM++ 2M SDE", False, True, False, "exponential"),
    ("DPM++ 2M SDE Heun", False, True, False, "exponential"),
    ("DPM++ 2S a", True, False, False, "karras"),
    ("DPM++ 3M SDE", False, True, True, "exponential"),
    ("Euler a", True, False, False, None),
    ("Euler", False, False, False, None),
    ("LMS", False, False, False, None),
    ("Heun", False, False, False, None),
    ("DPM2", False, False, True, "karras"),
    ("DPM2 a", True, False, True, "karras"),
    ("DPM fast", True, False, False, None),
    ("DPM adaptive", True, False, False, None),
    ("Restart", False, False, False, "karras"),
    ("LCM", False, False, False, None),
])
def test_registry_records_automatic1111s_sampler_options(name, uses_ensd, brownian, discard, automatic):
    """AUTOMATIC1111 1.10's sampler table (modules/sd_samplers_kdiffusion.py, sd_samplers_lcm.py), written out."""
    spec = resolve_sampler(name)
    assert (spec.uses_ensd, spec.brownian_noise, spec.discard_next_to_last_sigma, spec.automatic_schedule) == (
        uses_ensd, brownian, discard, automatic)
