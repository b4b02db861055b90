"""DDIM, PLMS and DPM-Solver++ as functions over a VP-space model (`sample_ddim`, `sample_plms`,
`sample_dpm_solver`): driven directly they match diffusers' schedulers, and the CompVis classes are shells over them
(the same latents bit for bit)."""
from __future__ import annotations

from functools import partial

import pytest
import torch
from diffusers import DDIMScheduler, PNDMScheduler

from ldm.models.diffusion.ddim import DDIMSampler, GuidedEpsModel, norm_thresholding, sample_ddim
from ldm.models.diffusion.dpm_solver import DPMSolverSampler, sample_dpm_solver
from ldm.models.diffusion.guidance import guided_model_output
from ldm.models.diffusion.noise import ImageNoise
from ldm.models.diffusion.plms import PLMSSampler, sample_plms
from ldm.models.diffusion.schedule import NoiseSchedule
from toy_diffusion import NonlinearToyDiffusion

SHAPE = (2, 4, 8, 8)
SEEDS = [21, 22]
SCALE = 6.0
SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def conditionings() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randn(2, 3, 8, generator=g), torch.randn(2, 3, 8, generator=g)


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours.double() - reference.double()).norm() / reference.double().norm()).item()


def ddim_steps(model, steps: int) -> tuple[list[int], torch.Tensor]:
    """Descending timesteps of a CompVis DDIM run and the alphas_cumprod each steps from and to."""
    schedule = NoiseSchedule(model.alphas_cumprod)
    timesteps = schedule.ddim_timesteps(steps)[::-1]
    alphas = torch.cat([model.alphas_cumprod[timesteps], model.alphas_cumprod[:1]])
    return timesteps, alphas


def guided(model, x, t, cond, uncond):
    out_uncond, out_cond = model.apply_model(x, t, uncond), model.apply_model(x, t, cond)
    return out_uncond + SCALE * (out_cond - out_uncond)


@pytest.mark.parametrize("param", ["eps", "v"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_sample_ddim_matches_diffusers_ddim(param, eta):
    model = NonlinearToyDiffusion(parameterization=param)
    cond, uncond = conditionings()
    timesteps, alphas = ddim_steps(model, 20)
    noise = ImageNoise(SEEDS)
    x_T = noise.randn(SHAPE)
    seen = []
    ours = sample_ddim(GuidedEpsModel(model), x_T, timesteps, alphas, disable=True, eta=eta,
                       randn_like=noise.randn_like, callback=seen.append,
                       extra_args={"cond": cond, "uncond": uncond, "cond_scale": SCALE})
    assert [info["i"] for info in seen] == list(range(20)) and [info["t"] for info in seen] == timesteps
    assert torch.equal(seen[-1]["x"], ours)

    prediction_type = {"eps": "epsilon", "v": "v_prediction"}[param]
    scheduler = DDIMScheduler(**SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              timestep_spacing="leading", prediction_type=prediction_type)
    scheduler.set_timesteps(20)
    assert scheduler.timesteps.tolist() == timesteps
    replay = ImageNoise(SEEDS)
    x = replay.randn(SHAPE)
    for t in scheduler.timesteps:
        extra = {"variance_noise": replay.randn_like(x)} if eta > 0 else {}
        x = scheduler.step(guided(model, x, t.expand(2), cond, uncond), t, x, eta=eta, **extra).prev_sample
    assert relative_error(ours, x) < 1e-5


def test_sample_plms_matches_diffusers_pndm():
    model = NonlinearToyDiffusion()
    cond, uncond = conditionings()
    timesteps, alphas = ddim_steps(model, 20)
    x_T = ImageNoise(SEEDS).randn(SHAPE)
    ours = sample_plms(GuidedEpsModel(model), x_T, timesteps, alphas, disable=True,
                       extra_args={"cond": cond, "uncond": uncond, "cond_scale": SCALE})
    assert model.calls == 21  # the improved-Euler first step costs one extra call

    scheduler = PNDMScheduler(**SCHEDULE, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1,
                              timestep_spacing="leading")
    scheduler.set_timesteps(20)
    x = x_T
    for t in scheduler.timesteps:
        x = scheduler.step(guided(model, x, t.expand(2), cond, uncond), t, x).prev_sample
    assert relative_error(ours, x) < 1e-5


@pytest.mark.parametrize("param", ["eps", "v"])
@pytest.mark.parametrize("sampler_class, function", [(DDIMSampler, sample_ddim), (PLMSSampler, sample_plms)])
def test_the_compvis_classes_are_shells_over_the_functions(param, sampler_class, function):
    model = NonlinearToyDiffusion(parameterization=param)
    cond, uncond = conditionings()
    mask = (torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)) > 0.5).float()
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2))
    eta = 0.5 if sampler_class is DDIMSampler else 0.0
    samples, _ = sampler_class(model).sample(10, 2, SHAPE[1:], conditioning=cond, unconditional_conditioning=uncond,
                                             unconditional_guidance_scale=SCALE, eta=eta, mask=mask, x0=x0,
                                             dynamic_threshold=1.5, noise=ImageNoise(SEEDS), verbose=False)
    noise = ImageNoise(SEEDS)
    x_T = noise.randn(SHAPE)
    timesteps, alphas = ddim_steps(model, 10)
    knobs = {"eta": eta} if function is sample_ddim else {}
    direct = function(GuidedEpsModel(model), x_T, timesteps, alphas, disable=True, randn_like=noise.randn_like,
                      mask=mask, x0=x0, denoised_transform=partial(norm_thresholding, value=1.5),
                      extra_args={"cond": cond, "uncond": uncond, "cond_scale": SCALE}, **knobs)
    assert torch.equal(samples, direct)


@pytest.mark.parametrize("param", ["eps", "v"])
@pytest.mark.parametrize("skip_type", ["time_uniform", "logSNR"])
def test_dpm_solver_sampler_is_a_shell_over_sample_dpm_solver(param, skip_type):
    model = NonlinearToyDiffusion(parameterization=param)
    cond, uncond = conditionings()
    samples, intermediates = DPMSolverSampler(model).sample(
        12, 2, SHAPE[1:], conditioning=cond, unconditional_conditioning=uncond, unconditional_guidance_scale=SCALE,
        noise=ImageNoise(SEEDS), verbose=False, skip_type=skip_type, log_every_t=4)
    schedule = NoiseSchedule(model.alphas_cumprod.float())
    seen = []
    direct = sample_dpm_solver(lambda x, t, **extra: guided_model_output(model, x, t, **extra),
                               ImageNoise(SEEDS).randn(SHAPE), schedule.dpm_solver_times(12, skip_type), schedule,
                               extra_args={"cond": cond, "uncond": uncond, "scale": SCALE}, disable=True,
                               parameterization=param, callback=seen.append)
    assert torch.equal(samples, direct)
    assert len(seen) == 12 and torch.equal(seen[-1]["x"], direct)
    assert len(intermediates["x_inter"]) == 5  # x_T, then the steps 11 (the first), 8, 4 and 0 from the end


def test_step_functions_refuse_what_they_cannot_do():
    model = NonlinearToyDiffusion()
    timesteps, alphas = ddim_steps(model, 5)
    x = torch.zeros(SHAPE)
    with pytest.raises(ValueError, match="need 6 alphas"):
        sample_ddim(GuidedEpsModel(model), x, timesteps, alphas[:-1], disable=True)
    with pytest.raises(ValueError, match="randn_like"):
        sample_ddim(GuidedEpsModel(model), x, timesteps, alphas, disable=True, eta=1.0)
    with pytest.raises(ValueError, match="randn_like"):
        sample_plms(GuidedEpsModel(model), x, timesteps, alphas, disable=True, mask=torch.ones(2, 1, 8, 8), x0=x)
    schedule = NoiseSchedule(model.alphas_cumprod)
    with pytest.raises(ValueError, match="order"):
        sample_dpm_solver(model.apply_model, x, schedule.dpm_solver_times(5), schedule, order=3)
    with pytest.raises(ValueError, match="parameterization"):
        sample_dpm_solver(model.apply_model, x, schedule.dpm_solver_times(5), schedule, parameterization="x0")
