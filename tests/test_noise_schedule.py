"""`NoiseSchedule` (ldm/models/diffusion/schedule.py): its noise levels against diffusers' schedulers, and its three
views of one schedule (k-diffusion sigmas and fractional timesteps, DDIM coefficients, DPM-Solver's continuous
time) against each other."""
from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler

from ldm.models.diffusion.k_denoisers import CompVisDenoiser
from ldm.models.diffusion.schedule import (NoiseSchedule, alpha_cumprod_from_sigma, make_ddim_timesteps,
                                           sigma_from_alpha_cumprod, sigma_to_lambda)
from toy_diffusion import NonlinearToyDiffusion, scaled_linear_alphas_cumprod

BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@pytest.fixture(scope="module")
def schedule() -> NoiseSchedule:
    return NoiseSchedule(scaled_linear_alphas_cumprod().float())


def test_sigmas_are_diffusers_sigmas():
    scheduler = EulerDiscreteScheduler(**BETAS)
    ours = NoiseSchedule(scheduler.alphas_cumprod)
    assert torch.equal(ours.get_sigmas(), scheduler.sigmas)  # all T levels, descending, then 0
    assert torch.equal(ours.sigmas, sigma_from_alpha_cumprod(scheduler.alphas_cumprod))
    assert ours.sigma_min == ours.sigmas[0] and ours.sigma_max == ours.sigmas[-1]


def test_ddim_coefficients_are_diffusers_ddim_alphas_and_variances():
    scheduler = DDIMScheduler(**BETAS, set_alpha_to_one=False, steps_offset=1)
    scheduler.set_timesteps(25)
    timesteps = make_ddim_timesteps("uniform", 25, 1000)
    assert timesteps == scheduler.timesteps.flip(0).tolist()
    coefficients = NoiseSchedule(scheduler.alphas_cumprod).ddim_coefficients(timesteps, eta=1.0)
    assert torch.equal(coefficients.alphas, scheduler.alphas_cumprod[timesteps])
    assert coefficients.alphas_prev[0] == scheduler.alphas_cumprod[0]
    assert torch.equal(coefficients.alphas_prev[1:], scheduler.alphas_cumprod[timesteps[:-1]])
    variances = torch.stack([scheduler._get_variance(t, t - 40) for t in timesteps[1:]])
    torch.testing.assert_close(coefficients.sigmas[1:] ** 2, variances, rtol=1e-5, atol=0)


def test_timesteps_and_noise_levels_convert_both_ways(schedule):
    t = torch.tensor([0.0, 0.25, 1.0, 17.5, 500.0, 998.75, 999.0])
    torch.testing.assert_close(schedule.sigma_to_t(schedule.t_to_sigma(t)), t, rtol=0, atol=2e-3)
    integers = torch.tensor([0, 1, 10, 500, 999])
    assert torch.equal(schedule.sigma_to_t(schedule.sigmas[integers] * 1.0001, quantize=True), integers)
    torch.testing.assert_close(schedule.t_to_sigma(integers.float()), schedule.sigmas[integers], rtol=1e-6, atol=0)


def test_alphas_cumprod_and_sigmas_convert_both_ways(schedule):
    torch.testing.assert_close(alpha_cumprod_from_sigma(schedule.sigmas), schedule.alphas_cumprod, rtol=2e-6, atol=0)


def test_the_continuous_time_view_agrees_with_the_discrete_one(schedule):
    t = schedule.continuous_times  # (n + 1) / T: DDPM step n
    assert torch.equal(schedule.timestep_at(t).round(), torch.arange(1000, dtype=torch.float32))
    torch.testing.assert_close(schedule.alpha_at(t) ** 2, schedule.alphas_cumprod, rtol=2e-6, atol=0)
    torch.testing.assert_close(schedule.sigma_vp_at(t) ** 2, 1 - schedule.alphas_cumprod, rtol=2e-5, atol=0)
    # lambda = log(alpha / sigma_vp) is -log sigma of the k-diffusion noise level
    torch.testing.assert_close(schedule.lambda_at(t), sigma_to_lambda(schedule.sigmas), rtol=0, atol=2e-5)
    middle = torch.linspace(0.002, 0.999, 37)
    torch.testing.assert_close(schedule.time_at_lambda(schedule.lambda_at(middle)), middle, rtol=0, atol=1e-5)


@pytest.mark.parametrize("skip_type", ["time_uniform", "logSNR", "time_quadratic"])
def test_dpm_solver_times_run_from_1_to_the_first_step(schedule, skip_type):
    times = schedule.dpm_solver_times(10, skip_type)
    assert times.shape == (11,) and bool((times[1:] < times[:-1]).all())
    torch.testing.assert_close(times[[0, -1]], torch.tensor([1.0, 1 / 1000]), rtol=1e-5, atol=0)
    if skip_type == "logSNR":
        steps = schedule.lambda_at(times).diff()
        torch.testing.assert_close(steps, steps.mean().expand(10), rtol=1e-3, atol=0)
    with pytest.raises(ValueError, match="skip_type"):
        schedule.dpm_solver_times(10, "uniform")


def test_lambda_of_a_float_is_float64_and_of_a_tensor_a_tensor():
    assert sigma_to_lambda(2.0) == -math.log(2.0)
    assert torch.equal(sigma_to_lambda(torch.tensor([2.0])), -torch.tensor([2.0]).log())


def test_the_denoiser_reads_the_models_schedule():
    toy = NonlinearToyDiffusion()
    denoiser = CompVisDenoiser(toy, quantize=False)
    schedule = NoiseSchedule(toy.alphas_cumprod)
    assert torch.equal(denoiser.sigmas, schedule.sigmas)
    assert torch.equal(denoiser.get_sigmas(7), schedule.get_sigmas(7))
    assert torch.equal(denoiser.get_sigmas_discrete(7), schedule.get_sigmas_discrete(7))
    sigma = torch.tensor([0.1, 3.0])
    assert torch.equal(denoiser.sigma_to_t(sigma), schedule.sigma_to_t(sigma))
    assert torch.equal(CompVisDenoiser(toy, quantize=True).sigma_to_t(sigma), schedule.sigma_to_t(sigma, quantize=True))


def test_bad_schedules_are_refused():
    with pytest.raises(ValueError, match="one value per timestep"):
        NoiseSchedule(torch.ones(1))
    with pytest.raises(ValueError, match="one value per timestep"):
        NoiseSchedule(torch.ones(4, 4))
    with pytest.raises(ValueError, match="strictly increasing"):
        NoiseSchedule(torch.tensor([0.9, 0.5, 0.7])).get_sigmas(2)
