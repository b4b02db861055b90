"""The CompVis samplers (DDIM, PLMS, DPM-Solver++) against diffusers' schedulers driven by hand on the same toy model,
and against the exact probability-flow ODE answer for Gaussian data.

Exact answer: for data N(mu, std^2) the marginal at alpha_bar a is N(sqrt(a) mu, a std^2 + 1 - a), the
probability-flow ODE is linear, and in one dimension its flow is the monotone map between those Gaussians, so the
standardized value z = (x - sqrt(a) mu) / sqrt(a std^2 + 1 - a) is constant along every trajectory.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler

from ldm.models.diffusion.ddim import DDIMSampler, make_ddim_timesteps
from ldm.models.diffusion.dpm_solver import DPMSolverSampler
from ldm.models.diffusion.guidance import guided_model_output
from ldm.models.diffusion.noise import ImageNoise
from ldm.models.diffusion.plms import PLMSSampler
from toy_diffusion import GaussianDataDiffusion, NonlinearToyDiffusion

SHAPE = (4, 8, 8)
SEEDS = [11, 12]
SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction"}


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours.double() - reference.double()).norm() / reference.double().norm()).item()


def conditionings() -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-attention-like contexts [B, tokens, 8] for NonlinearToyDiffusion: (cond, uncond)."""
    g = torch.Generator().manual_seed(3)
    return torch.randn(len(SEEDS), 3, 8, generator=g), torch.randn(len(SEEDS), 3, 8, generator=g)


def reference_output(model, x, t, cond, uncond, scale):
    """Classifier-free guidance the slow way: two separate model calls."""
    out = model.apply_model(x, t, cond)
    if uncond is None or scale == 1:
        return out
    out_uncond = model.apply_model(x, t, uncond)
    return out_uncond + scale * (out - out_uncond)


class InterpolatedGaussianDataDiffusion(GaussianDataDiffusion):
    """The exact Gaussian-data model at fractional timesteps too, with log alpha_bar interpolated linearly between
    integer timesteps as DPM-Solver's continuous time assumes (the base class truncates t to an integer)."""

    def alpha_bar(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        log_alphas_cumprod = self.alphas_cumprod.double().log()
        left = t.double().floor().clamp(0, self.num_timesteps - 2).long()
        weight = t.double() - left
        log_alpha_bar = log_alphas_cumprod[left] * (1 - weight) + log_alphas_cumprod[left + 1] * weight
        return log_alpha_bar.exp().reshape(-1, 1, 1, 1).to(x.dtype)

    def apply_model(self, x, t, cond):
        self.calls += 1
        a = self.alpha_bar(t, x)
        eps = (1 - a).sqrt() * (x - a.sqrt() * self.mu) / (a * self.std**2 + 1 - a)
        if self.parameterization == "eps":
            return eps
        x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
        return a.sqrt() * eps - (1 - a).sqrt() * x0


def probability_flow_answer(x_start: torch.Tensor, alpha_bar_start: float, alpha_bar_end: float, mu: float,
                            std: float) -> torch.Tensor:
    z = (x_start.double() - math.sqrt(alpha_bar_start) * mu) / math.sqrt(alpha_bar_start * std**2 + 1 - alpha_bar_start)
    return math.sqrt(alpha_bar_end) * mu + math.sqrt(alpha_bar_end * std**2 + 1 - alpha_bar_end) * z


def observed_order(steps: list[int], errors: list[float]) -> list[float]:
    return [math.log(e0 / e1) / math.log(s1 / s0) for s0, s1, e0, e1 in zip(steps, steps[1:], errors, errors[1:])]


# --- guidance -------------------------------------------------------------------------------------------------------
class RecordingToy(NonlinearToyDiffusion):
    """Accepts CompVis dict conditioning {"c_crossattn": [context]} and records each call's batch and conditioning."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.seen = []

    def apply_model(self, x, t, cond):
        self.seen.append((x.shape[0], cond))
        if isinstance(cond, dict):
            cond = torch.cat(cond["c_crossattn"], dim=1)
        return super().apply_model(x, t, cond)


@pytest.mark.parametrize("as_dict", [False, True])
def test_guidance_is_one_batched_call_equal_to_two_separate_calls(as_dict):
    model = RecordingToy()
    cond, uncond = conditionings()
    x = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500, 500])
    wrap = (lambda c: {"c_crossattn": [c]}) if as_dict else (lambda c: c)
    expected = reference_output(model, x, t, cond, uncond, 7.5)
    model.calls, model.seen = 0, []
    guided = guided_model_output(model, x, t, wrap(cond), wrap(uncond), 7.5)
    assert model.calls == 1 and model.seen[0][0] == 4
    batched = model.seen[0][1]["c_crossattn"][0] if as_dict else model.seen[0][1]
    torch.testing.assert_close(batched, torch.cat([uncond, cond]))  # unconditional half first, as CompVis
    torch.testing.assert_close(guided, expected, rtol=1e-6, atol=1e-6)
    assert relative_error(guided, model.apply_model(x, t, cond)) > 1e-2  # guidance really changed the output

    for scale, un in ((1.0, wrap(uncond)), (7.5, None)):
        model.calls, model.seen = 0, []
        single = guided_model_output(model, x, t, wrap(cond), un, scale)
        assert model.calls == 1 and model.seen[0][0] == 2
        torch.testing.assert_close(single, model.apply_model(x, t, cond), rtol=0, atol=0)


def test_ddim_makes_one_model_call_per_step_with_guidance():
    model = NonlinearToyDiffusion()
    cond, uncond = conditionings()
    DDIMSampler(model).sample(10, 2, SHAPE, conditioning=cond, unconditional_conditioning=uncond,
                              unconditional_guidance_scale=7.5, verbose=False, noise=ImageNoise(SEEDS))
    assert model.calls == 10


# --- DDIM -----------------------------------------------------------------------------------------------------------
def test_ddim_timesteps_match_compvis_and_diffusers():
    scheduler = DDIMScheduler(**SCHEDULE, steps_offset=1, timestep_spacing="leading")
    scheduler.set_timesteps(50)
    assert make_ddim_timesteps("uniform", 50, 1000) == scheduler.timesteps.flip(0).tolist()
    # CompVis keeps range(0, 1000, 1000 // S): 31 steps for S = 30, where diffusers' "leading" makes 30
    assert make_ddim_timesteps("uniform", 30, 1000) == list(range(1, 1000, 33))
    for steps in (1, 7, 50):
        expected = ((np.linspace(0, np.sqrt(1000 * 0.8), steps)) ** 2).astype(int) + 1
        assert make_ddim_timesteps("quad", steps, 1000) == expected.tolist()
    with pytest.raises(ValueError, match="between 1 and 1000"):
        make_ddim_timesteps("uniform", 0, 1000)


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_schedule_arrays_match_diffusers(eta):
    model = NonlinearToyDiffusion()
    sampler = DDIMSampler(model)
    sampler.make_schedule(20, ddim_eta=eta, verbose=False)
    scheduler = DDIMScheduler(**SCHEDULE, steps_offset=1, set_alpha_to_one=False, timestep_spacing="leading")
    scheduler.set_timesteps(20)
    steps = scheduler.timesteps.flip(0)
    previous = steps - 50
    alphas_prev = torch.stack([scheduler.alphas_cumprod[p] if p >= 0 else scheduler.final_alpha_cumprod
                               for p in previous])
    sigmas = torch.stack([eta * scheduler._get_variance(t, p) ** 0.5 for t, p in zip(steps, previous)])
    torch.testing.assert_close(sampler.ddim_alphas, scheduler.alphas_cumprod[steps], rtol=2e-6, atol=0)
    torch.testing.assert_close(sampler.ddim_alphas_prev, alphas_prev, rtol=2e-6, atol=0)
    assert sampler.ddim_alphas_prev[0] == model.alphas_cumprod[0]
    torch.testing.assert_close(sampler.ddim_sigmas, sigmas.float(), rtol=2e-5, atol=1e-7)


def diffusers_ddim_loop(model, param, steps, x, cond, uncond, scales, eta, noise):
    """diffusers' DDIMScheduler driven by hand; returns the final latents and each step's predicted x0."""
    scheduler = DDIMScheduler(**SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              timestep_spacing="leading", prediction_type=PREDICTION_TYPES[param])
    scheduler.set_timesteps(steps)
    predicted = []
    for i, t in enumerate(scheduler.timesteps):
        out = reference_output(model, x, t.expand(x.shape[0]), cond, uncond, scales[i])
        extra = {"variance_noise": noise.randn_like(x)} if eta > 0 else {}
        result = scheduler.step(out, t, x, eta=eta, **extra)
        x = result.prev_sample
        predicted.append(result.pred_original_sample)
    return x, predicted


@pytest.mark.parametrize("param", ["eps", "v"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
@pytest.mark.parametrize("guidance", ["none", "7.5", "schedule"])
def test_ddim_matches_diffusers(param, eta, guidance):
    steps = 20
    model = NonlinearToyDiffusion(parameterization=param)
    cond, uncond = conditionings()
    scales = {"none": [1.0] * steps, "7.5": [7.5] * steps, "schedule": np.linspace(9, 2, steps).tolist()}[guidance]
    seen_x0, seen_steps = [], []
    samples, intermediates = DDIMSampler(model).sample(
        steps, 2, SHAPE, conditioning=cond, eta=eta, verbose=False, noise=ImageNoise(SEEDS),
        unconditional_conditioning=None if guidance == "none" else uncond, unconditional_guidance_scale=scales[0],
        ucg_schedule=scales if guidance == "schedule" else None, log_every_t=5,
        img_callback=lambda pred_x0, i: seen_x0.append(pred_x0), callback=seen_steps.append)

    replay = ImageNoise(SEEDS)  # same seeds, drawn in the same order: x_T first, then one draw per step
    x_T = replay.randn((2, *SHAPE))
    expected, expected_x0 = diffusers_ddim_loop(model, param, steps, x_T, cond, uncond, scales, eta, replay)
    assert relative_error(samples, expected) < 1e-5
    assert seen_steps == list(range(steps))
    assert max(relative_error(a, b) for a, b in zip(seen_x0, expected_x0)) < 1e-5
    # logged at step indices 19 (the first step), 15, 10, 5 and 0, after x_T
    assert len(intermediates["x_inter"]) == len(intermediates["pred_x0"]) == 6
    torch.testing.assert_close(intermediates["x_inter"][0], x_T, rtol=0, atol=0)
    torch.testing.assert_close(intermediates["x_inter"][-1], samples, rtol=0, atol=0)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_batch_invariance(eta):
    model = NonlinearToyDiffusion()
    cond = torch.randn(4, 3, 8, generator=torch.Generator().manual_seed(5))
    batch, _ = DDIMSampler(model).sample(10, 4, SHAPE, conditioning=cond, eta=eta, verbose=False,
                                         noise=ImageNoise.from_seed(100, 4))
    for k in range(4):
        alone, _ = DDIMSampler(model).sample(10, 1, SHAPE, conditioning=cond[k:k + 1], eta=eta, verbose=False,
                                             noise=ImageNoise.from_seed(100 + k, 1))
        torch.testing.assert_close(batch[k:k + 1], alone, rtol=1e-6, atol=1e-6)
    if eta > 0:  # the noise really is per image: the same run with other seeds differs
        other, _ = DDIMSampler(model).sample(10, 4, SHAPE, conditioning=cond, eta=eta, verbose=False,
                                             x_T=ImageNoise.from_seed(100, 4).randn((4, *SHAPE)),
                                             noise=ImageNoise.from_seed(200, 4))
        assert relative_error(other, batch) > 1e-2


@pytest.mark.parametrize("param", ["eps", "v"])
def test_ddim_converges_at_first_order_to_the_probability_flow_answer(param):
    model = GaussianDataDiffusion(mu=0.5, std=0.5, parameterization=param)
    alphas = model.alphas_cumprod.double()
    steps, errors = [25, 50, 100, 200], []
    for count in steps:
        sampler = DDIMSampler(model)
        samples, _ = sampler.sample(count, 2, SHAPE, verbose=False, noise=ImageNoise(SEEDS))
        x_T = ImageNoise(SEEDS).randn((2, *SHAPE))
        exact = probability_flow_answer(x_T, alphas[sampler.ddim_timesteps[-1]].item(), alphas[0].item(), 0.5, 0.5)
        errors.append(relative_error(samples, exact))
    orders = observed_order(steps, errors)
    assert all(0.8 < order < 1.2 for order in orders), (errors, orders)  # measured ~0.95


def test_stochastic_encode_and_decode_match_diffusers_img2img():
    model = NonlinearToyDiffusion()
    cond, uncond = conditionings()
    x0 = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(8))
    noise = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(9))
    sampler = DDIMSampler(model)
    sampler.make_schedule(ddim_num_steps=25, ddim_eta=0.0, verbose=False)
    t_enc = 15
    z = sampler.stochastic_encode(x0, torch.tensor([t_enc] * 2), noise=noise)
    scheduler = DDIMScheduler(**SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                              timestep_spacing="leading")
    scheduler.set_timesteps(25)
    encode_step = int(sampler.ddim_timesteps[t_enc])
    assert relative_error(z, scheduler.add_noise(x0, noise, torch.tensor([encode_step]))) < 1e-6

    decoded = sampler.decode(z, cond, t_enc, unconditional_guidance_scale=5.0, unconditional_conditioning=uncond,
                             verbose=False)
    x = z
    for t in scheduler.timesteps[-t_enc:]:  # CompVis decodes from step t_enc - 1, one below the encoding step
        x = scheduler.step(reference_output(model, x, t.expand(2), cond, uncond, 5.0), t, x).prev_sample
    assert relative_error(decoded, x) < 1e-5


def test_masked_sampling_keeps_the_known_region_on_the_forward_marginal():
    """Before each step the region where mask is 1 is replaced by x0 noised to that step (noise from the image's
    stream after x_T); the rest is the sampler's own state."""
    model = NonlinearToyDiffusion()
    x0 = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(4))
    mask = torch.zeros(2, *SHAPE)
    mask[..., :4] = 1.0
    inputs = []
    model.apply_model = lambda x, t, cond: (inputs.append((x, t)), torch.zeros_like(x))[1]
    DDIMSampler(model).sample(5, 2, SHAPE, mask=mask, x0=x0, verbose=False, noise=ImageNoise(SEEDS))
    replay = ImageNoise(SEEDS)
    x_T = replay.randn((2, *SHAPE))
    assert len(inputs) == 5
    torch.testing.assert_close(inputs[0][0][..., 4:], x_T[..., 4:], rtol=0, atol=0)
    for x, t in inputs:
        a = model.alphas_cumprod[t[0]]
        expected = a.sqrt() * x0 + (1 - a).sqrt() * replay.randn_like(x0)
        torch.testing.assert_close(x[..., :4], expected[..., :4], rtol=1e-6, atol=1e-6)


# --- PLMS -----------------------------------------------------------------------------------------------------------
def diffusers_pndm_loop(model, param, steps, x, cond, uncond, scale):
    scheduler = PNDMScheduler(**SCHEDULE, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1,
                              prediction_type=PREDICTION_TYPES[param])
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        x = scheduler.step(reference_output(model, x, t.expand(x.shape[0]), cond, uncond, scale), t, x).prev_sample
    return x


@pytest.mark.parametrize("scale", [1.0, 7.5])
def test_plms_matches_diffusers_pndm(scale):
    """CompVis PLMS and diffusers PNDM (skip_prk_steps) are the same method for eps models: the first step is the
    pseudo improved-Euler step (diffusers repeats the second timestep to take it), then Adams-Bashforth 2, 3, 4 in
    eps, and diffusers' "formula (9)" of the PNDM paper is the DDIM update rewritten."""
    steps = 20
    model = NonlinearToyDiffusion()
    cond, uncond = conditionings()
    samples, _ = PLMSSampler(model).sample(steps, 2, SHAPE, conditioning=cond, unconditional_conditioning=uncond,
                                           unconditional_guidance_scale=scale, verbose=False, noise=ImageNoise(SEEDS))
    assert model.calls == steps + 1  # the improved-Euler first step costs one extra call
    x_T = ImageNoise(SEEDS).randn((2, *SHAPE))
    expected = diffusers_pndm_loop(model, "eps", steps, x_T, cond, uncond, scale)
    assert relative_error(samples, expected) < 1e-5


def test_plms_samples_v_models_as_their_eps_twins():
    """Our PLMS converts every v output to eps at its own (x, t) before combining, so a v model gives the run of the
    eps model it is a reparameterization of. diffusers' PNDM differs here on purpose of its own: it combines the raw
    v outputs of earlier steps and converts the mixture with the current step's x and alpha, which is not the eps
    combination, so it is compared in its eps form."""
    steps = 25
    ours_v, _ = PLMSSampler(GaussianDataDiffusion(parameterization="v")).sample(
        steps, 2, SHAPE, verbose=False, noise=ImageNoise(SEEDS))
    x_T = ImageNoise(SEEDS).randn((2, *SHAPE))
    expected = diffusers_pndm_loop(GaussianDataDiffusion(parameterization="eps"), "eps", steps, x_T, None, None, 1.0)
    assert relative_error(ours_v, expected) < 1e-5


def test_plms_converges_faster_than_ddim():
    model = GaussianDataDiffusion(mu=0.5, std=0.5)
    alphas = model.alphas_cumprod.double()
    steps, errors = [10, 20, 40], {"ddim": [], "plms": []}
    for count in steps:
        x_T = ImageNoise(SEEDS).randn((2, *SHAPE))
        for name, sampler in (("ddim", DDIMSampler(model)), ("plms", PLMSSampler(model))):
            samples, _ = sampler.sample(count, 2, SHAPE, verbose=False, noise=ImageNoise(SEEDS))
            exact = probability_flow_answer(x_T, alphas[sampler.ddim_timesteps[-1]].item(), alphas[0].item(), 0.5, 0.5)
            errors[name].append(relative_error(samples, exact))
    assert all(p < d / 4 for p, d in zip(errors["plms"], errors["ddim"])), errors  # measured 5x to 13x smaller
    assert observed_order([10, 40], errors["plms"][::2])[0] > 1.4, errors  # measured 1.6, DDIM 0.9


def test_plms_rejects_eta():
    with pytest.raises(ValueError, match="eta must be 0"):
        PLMSSampler(NonlinearToyDiffusion()).sample(10, 2, SHAPE, eta=0.5, verbose=False)


# --- DPM-Solver++ ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("param", ["eps", "v"])
@pytest.mark.parametrize("steps, scale", [(9, 1.0), (9, 7.5), (27, 1.0)])
def test_dpm_solver_matches_diffusers_where_their_timesteps_coincide(param, steps, scale):
    """With S dividing 999 our continuous times land on the integer timesteps 999 (1 - i / S) that diffusers'
    "linspace" spacing picks, and "sigma_min" makes diffusers stop at alphas_cumprod[0] as we do."""
    model = NonlinearToyDiffusion(parameterization=param)
    cond, uncond = conditionings()
    samples, _ = DPMSolverSampler(model).sample(steps, 2, SHAPE, conditioning=cond, unconditional_conditioning=uncond,
                                                unconditional_guidance_scale=scale, verbose=False,
                                                noise=ImageNoise(SEEDS))
    assert model.calls == steps
    scheduler = DPMSolverMultistepScheduler(**SCHEDULE, algorithm_type="dpmsolver++", solver_order=2,
                                            timestep_spacing="linspace", final_sigmas_type="sigma_min",
                                            prediction_type=PREDICTION_TYPES[param])
    scheduler.set_timesteps(steps)
    x = ImageNoise(SEEDS).randn((2, *SHAPE))
    for t in scheduler.timesteps:
        x = scheduler.step(reference_output(model, x, t.expand(2), cond, uncond, scale), t, x).prev_sample
    assert relative_error(samples, x) < 2e-5


@pytest.mark.parametrize("param", ["eps", "v"])
@pytest.mark.parametrize("steps, order", [(2, 2), (6, 1)])
def test_dpm_solver_first_order_steps_are_ddim_steps(param, steps, order):
    """DPM-Solver++ of order 1 is DDIM (eta 0) between the same times; with 2 steps, order 2 and lower_order_final
    both steps are first order. Times here are fractional timesteps 999 (1 - i / S), alphas interpolated in log."""
    model = NonlinearToyDiffusion(parameterization=param)
    cond, _ = conditionings()
    samples, _ = DPMSolverSampler(model).sample(steps, 2, SHAPE, conditioning=cond, order=order, verbose=False,
                                                noise=ImageNoise(SEEDS))
    model_times = 999 * (1 - np.arange(steps + 1) / steps)
    alpha_bars = np.exp(np.interp(model_times, np.arange(1000), model.alphas_cumprod.double().log().numpy()))
    x = ImageNoise(SEEDS).randn((2, *SHAPE))
    for i in range(steps):
        a, a_next = float(alpha_bars[i]), float(alpha_bars[i + 1])
        out = model.apply_model(x, torch.full((2,), model_times[i], dtype=torch.float32), cond)
        if param == "eps":
            eps, x0 = out, (x - math.sqrt(1 - a) * out) / math.sqrt(a)
        else:
            eps, x0 = math.sqrt(a) * out + math.sqrt(1 - a) * x, math.sqrt(a) * x - math.sqrt(1 - a) * out
        x = math.sqrt(a_next) * x0 + math.sqrt(1 - a_next) * eps
    assert relative_error(samples, x) < 1e-5


@pytest.mark.parametrize("param", ["eps", "v"])
def test_dpm_solver_converges_at_second_order_to_the_probability_flow_answer(param):
    """Measured with logSNR-uniform steps (orders 1.95, 1.99). The default time-uniform steps end with a step from
    timestep 999 / S to 0 whose size in lambda shrinks only like log(1000 / S), so at these step counts they show
    orders 1.1 to 1.5, far from the asymptotic 2."""
    model = InterpolatedGaussianDataDiffusion(mu=0.5, std=0.5, parameterization=param)
    alphas = model.alphas_cumprod.double()
    x_T = ImageNoise(SEEDS).randn((2, *SHAPE))
    exact = probability_flow_answer(x_T, alphas[-1].item(), alphas[0].item(), 0.5, 0.5)
    steps, errors = [20, 40, 80], []
    for count in steps:
        samples, _ = DPMSolverSampler(model).sample(count, 2, SHAPE, skip_type="logSNR", verbose=False,
                                                    noise=ImageNoise(SEEDS))
        errors.append(relative_error(samples, exact))
    orders = observed_order(steps, errors)
    assert all(1.8 < order < 2.2 for order in orders), (errors, orders)
    uniform = [relative_error(DPMSolverSampler(model).sample(count, 2, SHAPE, verbose=False,
                                                             noise=ImageNoise(SEEDS))[0], exact) for count in steps]
    assert uniform[0] > uniform[1] > uniform[2], uniform


def test_dpm_solver_rejects_what_it_cannot_do():
    sampler = DPMSolverSampler(NonlinearToyDiffusion())
    with pytest.raises(ValueError, match="eta must be 0"):
        sampler.sample(10, 2, SHAPE, eta=1.0, verbose=False)
    with pytest.raises(ValueError, match="mask"):
        sampler.sample(10, 2, SHAPE, mask=torch.ones(2, *SHAPE), x0=torch.zeros(2, *SHAPE), verbose=False)
    with pytest.raises(ValueError, match="ucg_schedule has 3"):
        sampler.sample(10, 2, SHAPE, ucg_schedule=[1.0, 2.0, 3.0], verbose=False)


def test_conditioning_batch_mismatch_is_reported_before_sampling():
    model = NonlinearToyDiffusion()
    cond, _ = conditionings()
    for sampler in (DDIMSampler(model), PLMSSampler(model), DPMSolverSampler(model)):
        with pytest.raises(ValueError, match="conditioning has batch size 2 but batch_size is 3"):
            sampler.sample(10, 3, SHAPE, conditioning=cond, verbose=False)
    assert model.calls == 0
