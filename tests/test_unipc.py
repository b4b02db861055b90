"""UniPC against diffusers' UniPCMultistepScheduler on the same toy model, conditioning and starting noise, and
against the exact probability-flow ODE answer for Gaussian data.

Schedules: the scheduler's default `timestep_spacing="linspace"` takes n integer timesteps round(k (T-1) / n),
k = n..1, then sigma 0: `CompVisDenoiser.get_sigmas_discrete(n)`. With Karras sigmas it rounds the timesteps it
gives the model, which is `quantize=True`. The scheduler works in x_t = x / sqrt(sigma^2 + 1); its start is
converted from ours, and its result back.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm.models.diffusion.k_denoisers import CompVisDenoiser, CompVisVDenoiser
from ldm.models.diffusion.k_schedules import get_sigmas_karras
from ldm.models.diffusion.noise import ImageNoise
from ldm.models.diffusion.samplers import sample
from ldm.models.diffusion.uni_pc import sample_unipc
from toy_diffusion import ContinuousGaussianData, NonlinearToyDiffusion

diffusers = pytest.importorskip("diffusers")

BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
SHAPE = (2, 4, 8, 8)
SEEDS = [5, 6]
SCALE = 5.0


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def conditioning() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    return torch.randn(SHAPE[0], 3, 8, generator=g), torch.randn(SHAPE[0], 3, 8, generator=g) * 0.1


def diffusers_unipc(toy, sigmas: torch.Tensor, steps: int, **config) -> torch.Tensor:
    scheduler = diffusers.UniPCMultistepScheduler(**BETAS, **config)
    scheduler.set_timesteps(steps)
    torch.testing.assert_close(scheduler.sigmas, sigmas, rtol=2e-6, atol=1e-7)
    cond, uncond = conditioning()
    x = ImageNoise(SEEDS).randn(SHAPE) * sigmas[0] / (sigmas[0] ** 2 + 1) ** 0.5
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(x, t)
        timesteps = t.expand(SHAPE[0])
        out_uncond = toy.apply_model(model_input, timesteps, uncond)
        out_cond = toy.apply_model(model_input, timesteps, cond)
        x = scheduler.step(out_uncond + SCALE * (out_cond - out_uncond), t, x).prev_sample
    return x * (sigmas[-1] ** 2 + 1) ** 0.5  # back from x_t space (a no-op at sigma 0)


def ours_unipc(toy, sigmas: torch.Tensor, denoiser_cls=CompVisDenoiser, **knobs) -> torch.Tensor:
    cond, uncond = conditioning()
    x = ImageNoise(SEEDS).randn(SHAPE) * sigmas[0]
    extra_args = {"cond": cond, "uncond": uncond, "cond_scale": SCALE}
    return sample_unipc(denoiser_cls(toy, quantize=True), x, sigmas, extra_args=extra_args, disable=True, **knobs)


def assert_same_latents(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    """Equal to float32 rounding, which the two accumulate differently from starting latents ~40 in size
    (measured: at most 1e-6 of the largest latent)."""
    scale = float(theirs.abs().max())
    assert scale > 0.1
    torch.testing.assert_close(ours, theirs, rtol=0, atol=5e-6 * scale)


@pytest.mark.parametrize("steps", [1, 2, 7, 10])
@pytest.mark.parametrize("karras", [False, True])
def test_unipc_defaults_match_diffusers(steps, karras):
    """Order 2, bh2, corrector on every step, last step first order."""
    toy = NonlinearToyDiffusion()
    denoiser = CompVisDenoiser(toy)
    if karras:
        sigmas = get_sigmas_karras(steps, denoiser.sigma_min, denoiser.sigma_max)
    else:
        sigmas = denoiser.get_sigmas_discrete(steps)
    assert_same_latents(ours_unipc(toy, sigmas), diffusers_unipc(toy, sigmas, steps, use_karras_sigmas=karras))


@pytest.mark.parametrize("order", [1, 3])
def test_unipc_orders_match_diffusers(order):
    toy = NonlinearToyDiffusion()
    sigmas = CompVisDenoiser(toy).get_sigmas_discrete(10)
    assert_same_latents(ours_unipc(toy, sigmas, order=order), diffusers_unipc(toy, sigmas, 10, solver_order=order))




@pytest.mark.parametrize("variant", ["bh1", "bh2"])
@pytest.mark.parametrize("lower_order_final", [True, False])
def test_unipc_variants_ending_above_sigma_0_match_diffusers(variant, lower_order_final):
    """Ending at sigma(t=0) (`final_sigmas_type="sigma_min"`): every step is a full predictor step. (With a final
    sigma 0, diffusers' bh1 returns NaN, 0 * B(h) with B(h) = -inf; here a step to sigma 0 is always first order.)"""
    toy = NonlinearToyDiffusion()
    denoiser = CompVisDenoiser(toy)
    sigmas = denoiser.get_sigmas_discrete(10)
    sigmas[-1] = denoiser.sigma_min
    config = dict(solver_type=variant, final_sigmas_type="sigma_min", lower_order_final=lower_order_final)
    assert_same_latents(ours_unipc(toy, sigmas, variant=variant, lower_order_final=lower_order_final),
                        diffusers_unipc(toy, sigmas, 10, **config))


def test_unipc_without_corrector_matches_diffusers():
    toy = NonlinearToyDiffusion()
    sigmas = CompVisDenoiser(toy).get_sigmas_discrete(10)
    ours = ours_unipc(toy, sigmas, corrector=False)
    assert_same_latents(ours, diffusers_unipc(toy, sigmas, 10, disable_corrector=list(range(10))))
    assert (ours - ours_unipc(toy, sigmas)).abs().max() > 1e-3  # the corrector does change the result


def test_unipc_v_prediction_matches_diffusers():
    toy = NonlinearToyDiffusion(parameterization="v")
    sigmas = CompVisDenoiser(toy).get_sigmas_discrete(10)
    assert_same_latents(ours_unipc(toy, sigmas, denoiser_cls=CompVisVDenoiser),
                        diffusers_unipc(toy, sigmas, 10, prediction_type="v_prediction"))


def test_entry_point_unipc_matches_diffusers():
    """`sample(..., "unipc")` starts at x_T * sigma_max (k-diffusion), diffusers at unit-variance x_t: converted."""
    toy = NonlinearToyDiffusion()
    cond, uncond = conditioning()
    ours = sample(toy, "UniPC", 10, SHAPE, cond, uncond, SCALE, ImageNoise(SEEDS), disable=True)
    assert_same_latents(ours, diffusers_unipc(toy, CompVisDenoiser(toy).get_sigmas_discrete(10), 10))


def test_unipc_rejects_unknown_settings():
    toy = NonlinearToyDiffusion()
    sigmas = CompVisDenoiser(toy).get_sigmas_discrete(4)
    with pytest.raises(ValueError, match="order 4"):
        ours_unipc(toy, sigmas, order=4)
    with pytest.raises(ValueError, match="bh3"):
        ours_unipc(toy, sigmas, variant="bh3")


@pytest.mark.parametrize("order, expected", [(1, 2.0), (2, 3.0), (3, 1.9)])
def test_unipc_converges_to_the_exact_ode_solution(order, expected):
    """Against the exact probability-flow ODE answer for Gaussian data, on Karras sigmas down to sigma(t=0).

    The corrector adds one order to the predictor's (UniPC-p has order p + 1). Measured over 20 -> 40 -> 80 steps:
    p = 1: 1.96, 1.99; p = 2 (the default): 3.12, 3.32; p = 3: 1.85, 2.51, where the first-order last step and the
    second-order one before it dominate errors that are already 1e-3 at 20 steps."""
    toy = ContinuousGaussianData().double()
    cond = torch.tensor([0.3, -0.4], dtype=torch.float64)
    denoiser = CompVisDenoiser(toy, quantize=False)
    errors, step_counts = [], [20, 40, 80]
    for steps in step_counts:
        sigmas = get_sigmas_karras(steps + 1, denoiser.sigma_min, denoiser.sigma_max, dtype=torch.float64)[:-1]
        x = ImageNoise(SEEDS).randn(SHAPE, dtype=torch.float64) * sigmas[0]
        out = sample_unipc(denoiser, x, sigmas, extra_args={"cond": cond}, disable=True, order=order)
        mean = toy.mu + cond.reshape(-1, 1, 1, 1)
        exact = mean + (x - mean) * ((toy.std**2 + sigmas[-1] ** 2) / (toy.std**2 + sigmas[0] ** 2)) ** 0.5
        errors.append(float((out - exact).abs().max()))
    orders = [float(np.log(e0 / e1) / np.log(2)) for e0, e1 in zip(errors, errors[1:])]
    assert min(orders) > expected - 0.2, (errors, orders)
