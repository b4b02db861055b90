"""diffusers' timestep spacings as schedule types (Leading, Linspace, Trailing, LCM) and DDIM's trailing timesteps,
against diffusers' schedulers: their sigmas and timesteps, and short sampling runs on one toy model, conditioning and
noise (Euler, Euler a, LCM, DDIM).

What is compared, and where the two differ on purpose:
- Sigmas: bit for bit, given the same alphas_cumprod (diffusers computes them as float32 cumprods, CompVis in float64
  rounded once; the schedules below are built from diffusers' so that the comparison is exact).
- Starting latents: diffusers starts its "leading" Euler runs at noise * sqrt(sigma_max^2 + 1) and its LCM and DDIM
  runs at the unit noise itself; the k-diffusion samplers always start at noise * sigma_max (AUTOMATIC1111's
  convention). The runs here give diffusers our starting latents, so the samplers are compared, not the conventions.
- LCM: our sampler is AUTOMATIC1111's (k-diffusion style, in the variance-exploding variable x / sqrt(alpha)), with
  the boundary condition of diffusers' `LCMScheduler` (sigma_data 0.5, timestep scaled by 10) applied to that
  variable: c_skip * x instead of c_skip * sqrt(alpha) x, a difference of c_skip < 4e-8 at the timesteps below. On
  the `LCM` schedule type it takes LCMScheduler's timesteps; AUTOMATIC1111's own LCM schedule (Automatic) spaces its
  timesteps evenly over the 50 distilled ones instead (999, 679, 339, 19 for 4 steps, not 999, 759, 499, 259).
- DDIM trailing: diffusers steps from timestep t to t - T // n, not to the next timestep of its list; the two agree
  when n divides T (2, 4, 8 of 1000), and for 12 steps diffusers' DDIM steps to 916 - 83 = 833 while its next model
  call is at 832. Ours steps to the next listed timestep, so only the n that divide T are compared.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm.models.diffusion import k_sampling
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.k_denoisers import CompVisDenoiser, LCMCompVisDenoiser
from ldm.models.diffusion.noise import ImageNoise
from ldm.models.diffusion.schedule import NoiseSchedule, make_ddim_timesteps
from ldm.models.diffusion.schedule_types import (SCHEDULE_TYPES, SPACING_TYPES, ScheduleOptions,
                                                 available_schedule_types, infotext_schedule_type,
                                                 resolve_schedule_type, schedule_type)
from toy_diffusion import NonlinearToyDiffusion

diffusers = pytest.importorskip("diffusers")

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BETAS = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}
SD_CONFIG = {**BETAS, "steps_offset": 1}  # what SD 1.x/2.x/XL's scheduler_config.json files say
SHAPE = (2, 4, 8, 8)
SEEDS = [21, 22]
SCALE = 3.0


def diffusers_schedule() -> NoiseSchedule:
    return NoiseSchedule(diffusers.EulerDiscreteScheduler(**BETAS).alphas_cumprod.float())


def toy_model() -> NonlinearToyDiffusion:
    """The toy model on diffusers' float32 alphas_cumprod, so both sides see the same schedule to the bit."""
    toy = NonlinearToyDiffusion()
    toy.alphas_cumprod.copy_(diffusers_schedule().alphas_cumprod)
    return toy


def conditioning() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randn(SHAPE[0], 3, 8, generator=g), torch.randn(SHAPE[0], 3, 8, generator=g) * 0.1


def guided(toy, x, t, cond, uncond):
    out_uncond, out_cond = toy.apply_model(x, t, uncond), toy.apply_model(x, t, cond)
    return out_uncond + SCALE * (out_cond - out_uncond)


def assert_close(ours: torch.Tensor, theirs: torch.Tensor, rtol: float = 1e-5) -> None:
    error = float((ours - theirs).abs().max() / theirs.abs().max())
    assert float(theirs.abs().max()) > 0.1 and error < rtol, error


# --- the schedules ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("spacing", ["leading", "linspace", "trailing"])
@pytest.mark.parametrize("steps", [1, 2, 3, 4, 8, 12, 25])
def test_spacings_are_diffusers_euler_sigmas(spacing, steps):
    schedule = diffusers_schedule()
    for scheduler_class in (diffusers.EulerDiscreteScheduler, diffusers.EulerAncestralDiscreteScheduler):
        scheduler = scheduler_class(**SD_CONFIG, timestep_spacing=spacing)
        scheduler.set_timesteps(steps)
        assert torch.equal(schedule_type(spacing)(steps, 0.03, 14.6, schedule), scheduler.sigmas)


def test_leading_takes_the_steps_offset():
    schedule = diffusers_schedule()
    scheduler = diffusers.EulerDiscreteScheduler(**BETAS, steps_offset=0, timestep_spacing="leading")
    scheduler.set_timesteps(4)
    sigmas = schedule_type("leading")(4, 0.03, 14.6, schedule, options=ScheduleOptions(steps_offset=0))
    assert torch.equal(sigmas, scheduler.sigmas)
    assert scheduler.timesteps.tolist() == [750, 500, 250, 0]


@pytest.mark.parametrize("steps", [1, 2, 4, 6, 8, 12, 50])
def test_lcm_schedule_is_lcm_schedulers_timesteps(steps):
    schedule = diffusers_schedule()
    scheduler = diffusers.LCMScheduler(**SD_CONFIG)
    scheduler.set_timesteps(steps)
    expected = torch.cat([schedule.sigmas[scheduler.timesteps], torch.zeros(1)])
    assert torch.equal(schedule_type("LCM")(steps, 0.03, 14.6, schedule), expected)
    with pytest.raises(ValueError, match="at most 50"):
        schedule_type("lcm")(51, 0.03, 14.6, schedule)


@pytest.mark.parametrize("steps", [1, 2, 3, 4, 8, 12])
def test_ddim_trailing_timesteps_are_diffusers(steps):
    scheduler = diffusers.DDIMScheduler(**SD_CONFIG, timestep_spacing="trailing", set_alpha_to_one=False,
                                        clip_sample=False)
    scheduler.set_timesteps(steps)
    assert make_ddim_timesteps("trailing", steps, 1000) == scheduler.timesteps.flip(0).tolist()


def test_spacings_are_named_apart_from_automatic1111s():
    assert len(SCHEDULE_TYPES) == 12 and "Trailing" not in available_schedule_types()
    assert [entry.label for entry in SPACING_TYPES] == ["Leading", "Linspace", "Trailing", "LCM"]
    assert schedule_type("TRAILING").name == "trailing"
    assert resolve_schedule_type("Euler", "trailing").label == "Trailing"
    assert infotext_schedule_type("LCM", "lcm") == "LCM"
    with pytest.raises(ValueError, match="Trailing"):
        schedule_type("trailling")


# --- sampling runs ------------------------------------------------------------------------------------------------
def euler_loop(scheduler, toy, x, generators=None):
    """diffusers' pipeline loop over an Euler scheduler, guided as its pipelines guide."""
    cond, uncond = conditioning()
    kwargs = {"generator": generators} if generators is not None else {}
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t)
        eps = guided(toy, model_input, t.expand(x.shape[0]), cond, uncond)
        x = scheduler.step(eps, t, x, **kwargs).prev_sample
    return x


def run_k_sampler(sampler, toy, sigmas, denoiser_class=CompVisDenoiser) -> tuple[torch.Tensor, ImageNoise]:
    cond, uncond = conditioning()
    noise = ImageNoise(SEEDS)
    x = noise.randn(SHAPE) * sigmas[0]
    denoiser = denoiser_class(toy)
    out = sampler(denoiser, x, sigmas, extra_args={"cond": cond, "uncond": uncond, "cond_scale": SCALE},
                  disable=True, noise_sampler=noise.noise_sampler(x))
    return out, noise


def start(sigma: torch.Tensor) -> tuple[torch.Tensor, ImageNoise]:
    """Our starting latents and the noise streams after drawing them (diffusers continues them)."""
    noise = ImageNoise(SEEDS)
    return noise.randn(SHAPE) * sigma, noise


@pytest.mark.parametrize("spacing", ["trailing", "leading"])
@pytest.mark.parametrize("steps", [1, 4, 8])
def test_euler_on_a_spacing_matches_diffusers(spacing, steps):
    toy = toy_model()
    scheduler = diffusers.EulerDiscreteScheduler(**SD_CONFIG, timestep_spacing=spacing)
    scheduler.set_timesteps(steps)
    sigmas = schedule_type(spacing)(steps, 0.03, 14.6, NoiseSchedule(toy.alphas_cumprod))
    ours, _ = run_k_sampler(k_sampling.sample_euler, toy, sigmas)
    x, _ = start(sigmas[0])
    assert_close(ours, euler_loop(scheduler, toy, x))


@pytest.mark.parametrize("steps", [1, 2, 4])
def test_euler_ancestral_trailing_matches_diffusers_with_the_same_noise(steps):
    toy = toy_model()
    scheduler = diffusers.EulerAncestralDiscreteScheduler(**SD_CONFIG, timestep_spacing="trailing")
    scheduler.set_timesteps(steps)
    sigmas = schedule_type("trailing")(steps, 0.03, 14.6, NoiseSchedule(toy.alphas_cumprod))
    ours, _ = run_k_sampler(k_sampling.sample_euler_ancestral, toy, sigmas)
    x, noise = start(sigmas[0])
    assert_close(ours, euler_loop(scheduler, toy, x, generators=noise.generators))


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_lcm_sampler_on_the_lcm_schedule_matches_lcm_scheduler(steps):
    toy = toy_model()
    scheduler = diffusers.LCMScheduler(**SD_CONFIG)
    scheduler.set_timesteps(steps)
    sigmas = schedule_type("lcm")(steps, 0.03, 14.6, NoiseSchedule(toy.alphas_cumprod))
    ours, _ = run_k_sampler(k_sampling.sample_lcm, toy, sigmas, denoiser_class=LCMCompVisDenoiser)

    x, noise = start(sigmas[0])
    x = x / (sigmas[0] ** 2 + 1) ** 0.5  # LCMScheduler steps the variance-preserving x_t
    cond, uncond = conditioning()
    for t in scheduler.timesteps:
        eps = guided(toy, x, t.expand(SHAPE[0]), cond, uncond)
        x, denoised = scheduler.step(eps, t, x, generator=noise.generators, return_dict=False)
    assert_close(ours, denoised)  # its pipeline decodes the last step's denoised latents


def test_automatic1111s_lcm_schedule_differs_from_lcm_schedulers():
    denoiser = LCMCompVisDenoiser(toy_model())
    ours = denoiser.sigma_to_t(denoiser.get_sigmas(4)[:-1]).tolist()
    assert ours == [999, 679, 339, 19]
    scheduler = diffusers.LCMScheduler(**SD_CONFIG)
    scheduler.set_timesteps(4)
    assert scheduler.timesteps.tolist() == [999, 759, 499, 259]


def ddim_loop(scheduler, toy, x):
    cond, uncond = conditioning()
    for t in scheduler.timesteps:
        x = scheduler.step(guided(toy, x, t.expand(SHAPE[0]), cond, uncond), t, x).prev_sample
    return x


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_ddim_trailing_matches_diffusers(steps):
    toy = toy_model()
    cond, uncond = conditioning()
    scheduler = diffusers.DDIMScheduler(**SD_CONFIG, timestep_spacing="trailing", set_alpha_to_one=False,
                                        clip_sample=False)
    scheduler.set_timesteps(steps)
    x_T = ImageNoise(SEEDS).randn(SHAPE)
    ours, _ = DDIMSampler(toy).sample(S=steps, batch_size=SHAPE[0], shape=SHAPE[1:], conditioning=cond,
                                      unconditional_conditioning=uncond, unconditional_guidance_scale=SCALE,
                                      x_T=x_T, verbose=False, ddim_discretize="trailing")
    assert_close(ours, ddim_loop(scheduler, toy, x_T))


def test_ddim_trailing_is_euler_trailing_stopped_at_the_lowest_sigma():
    """Why the presets run Hyper-SD's "DDIM, trailing" as Euler on Trailing: deterministic DDIM is Euler in the
    k-diffusion variable; only its last step goes to alphas_cumprod[0] (sigma 0.029) instead of 0, and it returns the
    variance-preserving latents there."""
    toy = toy_model()
    cond, uncond = conditioning()
    schedule = NoiseSchedule(toy.alphas_cumprod)
    sigmas = schedule_type("trailing")(4, 0.03, 14.6, schedule)
    sigmas[-1] = schedule.sigma_min
    x_T = ImageNoise(SEEDS).randn(SHAPE)
    denoiser = CompVisDenoiser(toy, quantize=True)
    euler = k_sampling.sample_euler(denoiser, x_T * (sigmas[0] ** 2 + 1) ** 0.5, sigmas,
                                    extra_args={"cond": cond, "uncond": uncond, "cond_scale": SCALE}, disable=True)
    ddim, _ = DDIMSampler(toy).sample(S=4, batch_size=SHAPE[0], shape=SHAPE[1:], conditioning=cond,
                                      unconditional_conditioning=uncond, unconditional_guidance_scale=SCALE,
                                      x_T=x_T, verbose=False, ddim_discretize="trailing")
    assert_close(euler / (schedule.sigma_min**2 + 1) ** 0.5, ddim)


def test_spacings_refuse_steps_past_the_schedule():
    with pytest.raises(ValueError, match="fewer steps"):
        schedule_type("leading")(1001, 0.03, 14.6, diffusers_schedule())
    assert np.isfinite(schedule_type("trailing")(1000, 0.03, 14.6, diffusers_schedule()).numpy()).all()
