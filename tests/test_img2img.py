"""img2img: the library path against diffusers' StableDiffusionImg2ImgPipeline on the same weights, image and seeds;
what CompVis does at the edges of --strength; the CLI end to end, its seeds and its refusals.

CompVis and diffusers noise the init image to different levels by design: for t_enc = int(strength * steps) both
run the last t_enc DDIM steps, but CompVis' `stochastic_encode(x0, t_enc)` noises to DDIM step t_enc, one step
above the first step it runs, while diffusers noises to that first step. The DDIM comparison therefore gives
diffusers' scheduler CompVis' noising (`CompVisNoisingDDIM`, one line); everything else (preprocessing, encoder,
posterior sampling, per-image generators, guidance, DDIM steps, decoder) is diffusers' own. For k-diffusion samplers
we noise as A1111 and diffusers do, so Euler is compared with the unmodified pipeline.
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline
from PIL import Image

from checkpoint_factory import TEST_CONFIGS
from image_files import pixels
from ldm.pipeline.decoding import to_uint8
from ldm.cli.img2img import main
from ldm.models.diffusion.samplers import encoded_latents as init_latents
from ldm.pipeline.addons.init_image import encode_image as encode_init_image
from ldm.pipeline.images import image_to_tensor
from ldm.loading import load_model
from ldm.models.diffusion.noise import ImageNoise
from ldm.models.diffusion.samplers import sample, sample_img2img
from reference_sd import NEGATIVE, PROMPT, SCALE, SCHEDULE, CompVisNoisingDDIM, diffusers_pipeline
from smooth_inputs import smooth_image

STEPS, STRENGTH, SEEDS = 10, 0.75, [5, 6]  # 10 divides 1000: DDIM's and diffusers' timesteps agree
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_model(tiny_checkpoint, TEST_CONFIGS / "tiny-v1.yaml")


def our_latents(model, sampler: str, image: Image.Image, strength: float, seeds=SEEDS, steps=STEPS):
    noise = ImageNoise(seeds)
    x_init = init_latents(model, encode_init_image(model, image_to_tensor(image, *image.size)), noise)
    cond = model.get_learned_conditioning([PROMPT] * len(seeds))
    uncond = model.get_learned_conditioning([NEGATIVE] * len(seeds))
    return x_init, sample_img2img(model, sampler, steps, x_init, strength, cond, uncond, SCALE, noise, disable=True)


# --- (a) the library path equals diffusers' img2img pipeline -------------------------------------------------------
@pytest.mark.parametrize("sampler, scheduler", [
    ("ddim", CompVisNoisingDDIM(clip_sample=False, timestep_spacing="leading", **SCHEDULE)),
    ("euler", EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                     timestep_spacing="linspace", steps_offset=1)),
], ids=["ddim", "euler"])
@torch.no_grad()
def test_same_images_as_diffusers_img2img_pipeline(model, tiny_checkpoint, tmp_path, sampler, scheduler):
    image = smooth_image(64, 64)
    _, latents = our_latents(model, sampler, image, STRENGTH)
    ours = ((model.decode_first_stage(latents) + 1) / 2).clamp(0, 1)
    components = diffusers_pipeline(tiny_checkpoint, tmp_path, scheduler).components
    pipe = StableDiffusionImg2ImgPipeline(**components, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    reference = pipe(PROMPT, image=image, strength=STRENGTH, negative_prompt=NEGATIVE, num_inference_steps=STEPS,
                     guidance_scale=SCALE, num_images_per_prompt=len(SEEDS), output_type="pt",
                     generator=[torch.Generator().manual_seed(seed) for seed in SEEDS]).images
    assert ours.shape == reference.shape == (2, 3, 64, 64)
    assert (reference[0] - reference[1]).abs().max() > 0.01  # each image has its own seed
    torch.testing.assert_close(ours, reference, atol=2e-5, rtol=0)


def test_compvis_noising_is_one_ddim_step_above_diffusers():
    """The one change made to diffusers above is the gap between the two conventions, and nothing more."""
    scheduler = CompVisNoisingDDIM(clip_sample=False, timestep_spacing="leading", **SCHEDULE)
    scheduler.set_timesteps(STEPS)
    first_run = scheduler.timesteps[STEPS - int(STRENGTH * STEPS)]
    assert int(first_run) == 601 and [int(t) for t in scheduler.timesteps[:3]] == [901, 801, 701]
    x0, noise = torch.ones(1, 1), torch.zeros(1, 1)
    alpha_701 = float(scheduler.alphas_cumprod[701])
    assert math.isclose(float(scheduler.add_noise(x0, noise, first_run[None])), alpha_701 ** 0.5, rel_tol=1e-6)


# --- (b) the edges of strength, as CompVis has them ------------------------------------------------------------------
@torch.no_grad()
def test_strength_0_with_ddim_is_the_init_latent_noised_to_timestep_1(model):
    """CompVis: t_enc = 0 noises to DDIM step 0 (timestep 1) and `decode` runs no step, so the latents are
    sqrt(a_1) x0 + sqrt(1 - a_1) n, with a_1 from the scaled-linear betas written out here."""
    x_init, latents = our_latents(model, "ddim", smooth_image(64, 64), 0.0)
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    alpha_1 = (1 - betas[0]) * (1 - betas[1])
    streams = ImageNoise(SEEDS)
    streams.randn(x_init.shape)  # the posterior sample's draw
    expected = alpha_1 ** 0.5 * x_init + (1 - alpha_1) ** 0.5 * streams.randn(x_init.shape)
    torch.testing.assert_close(latents, expected, atol=1e-6, rtol=0)
    assert abs(float((latents - x_init).std()) - (1 - alpha_1) ** 0.5) < 0.01  # 4% noise stays, as in CompVis


@torch.no_grad()
def test_strength_0_with_a_k_sampler_returns_the_init_latents(model):
    x_init, latents = our_latents(model, "euler_a", smooth_image(64, 64), 0.0)
    assert torch.equal(latents, x_init)


@torch.no_grad()
def test_strength_1_with_ddim_starts_from_pure_noise(model):
    """CompVis fails with an index error at strength 1 (DDIM step 10 of 10 does not exist); here the image is gone
    entirely: the result is txt2img's DDIM from the image's next noise draw, whatever the init image was."""
    _, from_first = our_latents(model, "ddim", smooth_image(64, 64, seed=1), 1.0)
    _, from_second = our_latents(model, "ddim", smooth_image(64, 64, seed=2), 1.0)
    assert torch.equal(from_first, from_second)
    streams = ImageNoise(SEEDS)
    streams.randn((2, 4, 8, 8))  # the posterior sample's draw
    cond = model.get_learned_conditioning([PROMPT] * 2)
    uncond = model.get_learned_conditioning([NEGATIVE] * 2)
    txt2img = sample(model, "ddim", STEPS, (2, 4, 8, 8), cond, uncond, SCALE, ImageNoise(SEEDS),
                     x_T=streams.randn((2, 4, 8, 8)), disable=True)
    torch.testing.assert_close(from_first, txt2img, atol=1e-6, rtol=0)


@torch.no_grad()
def test_plms_cannot_start_from_an_image(model):
    with pytest.raises(ValueError, match="'plms' cannot start from an image"):
        our_latents(model, "plms", smooth_image(64, 64), STRENGTH)


# --- (c, e) the CLI end to end -------------------------------------------------------------------------------------
@pytest.fixture
def cli(tiny_checkpoint, tiny_config, tmp_path, capsys):
    """cli(*flags) -> (exit status, stdout, stderr), on the tiny model with 4 steps."""
    def run(*flags):
        base = ["--ckpt", str(tiny_checkpoint), "--config", str(tiny_config), "--ddim_steps", "4",
                "--precision", "full"]
        status = main(base + [str(flag) for flag in flags])
        captured = capsys.readouterr()
        return status, captured.out, captured.err
    return run


@torch.no_grad()
def test_cli_writes_images_with_their_init_image_and_strength(cli, model, tmp_path):
    init = tmp_path / "sketch.png"
    smooth_image(70, 50).save(init)  # rounded down to 64x48, the tiny model's multiple of 16
    status, out, err = cli("--init-img", init, "--strength", 0.5, "--outdir", tmp_path / "out", "--seed", 42)
    assert status == 0, err
    assert "target t_enc is 2 steps" in out
    samples = tmp_path / "out" / "samples"
    assert sorted(path.name for path in samples.glob("*.png")) == ["00000.png", "00001.png"]  # n_samples 2
    assert (tmp_path / "out" / "grid-0000.png").exists()
    with Image.open(samples / "00001.png") as saved:
        assert saved.size == (64, 48)
        parameters = saved.info["parameters"]
    init_hash = hashlib.sha256(init.read_bytes()).hexdigest()[:10]
    assert "Seed: 43, Size: 64x48" in parameters
    assert parameters.endswith(f"Denoising strength: 0.5, Init image: sketch.png, Init image hash: {init_hash}, "
                              "Version: latent-diffusion")
    sidecar = yaml.safe_load((samples / "00001.yaml").read_text(encoding="utf-8"))
    assert (sidecar["strength"], sidecar["init_image"], sidecar["init_image_hash"]) == (0.5, str(init), init_hash)
    assert (sidecar["scale"], sidecar["steps"], sidecar["sampler"]) == (5.0, 4, "ddim")  # CompVis img2img defaults

    # the CLI's images are the library path's: LANCZOS resize, per-seed posterior and noise, DDIM
    image = Image.open(init).convert("RGB").resize((64, 48), resample=Image.LANCZOS)
    cond = model.get_learned_conditioning(["a painting of a virus monster playing guitar"] * 2)
    uncond = model.get_learned_conditioning([""] * 2)
    noise = ImageNoise([42, 43])
    x_init = init_latents(model, encode_init_image(model, image_to_tensor(image, 64, 48)), noise)
    latents = sample_img2img(model, "ddim", 4, x_init, 0.5, cond, uncond, 5.0, noise, disable=True)
    expected = to_uint8(model.decode_first_stage(latents))
    for index in range(2):
        assert np.abs(pixels(samples / f"0000{index}.png").astype(int) - expected[index]).max() <= 1


def test_cli_seeds_reproduce_across_runs_and_batch_sizes(cli, tmp_path):
    init = tmp_path / "sketch.png"
    smooth_image(64, 64).save(init)
    flags = ("--init-img", init, "--outdir", tmp_path / "out", "--sampler", "euler_a", "--skip_grid")
    assert cli(*flags, "--seed", 7)[0] == 0  # seeds 7 and 8
    assert cli(*flags, "--seed", 8, "--n_samples", 1)[0] == 0  # seed 8 alone
    samples = tmp_path / "out" / "samples"
    assert sorted(path.name for path in samples.glob("*.png")) == ["00000.png", "00001.png", "00002.png"]
    assert np.array_equal(pixels(samples / "00001.png"), pixels(samples / "00002.png"))
    assert not np.array_equal(pixels(samples / "00000.png"), pixels(samples / "00001.png"))


@pytest.mark.parametrize("strength", [0.75, 0.3, 1.0])
def test_compile_warm_up_runs_the_unet_once_whatever_the_strength(cli, tmp_path, monkeypatch, strength):
    import ldm.optimize
    from ldm.models.diffusion.ddpm import LatentDiffusion

    init = tmp_path / "sketch.png"
    smooth_image(64, 64).save(init)
    calls = []
    real_apply = LatentDiffusion.apply_model
    monkeypatch.setattr(ldm.optimize, "compile_model", lambda model: calls.append("compiled") or ["unet"])
    monkeypatch.setattr(LatentDiffusion, "apply_model",
                        lambda self, *args, **kwargs: calls.append("unet") or real_apply(self, *args, **kwargs))
    status, out, err = cli("--init-img", init, "--strength", strength, "--compile", "--ddim_steps", 1,
                           "--n_samples", 1, "--outdir", tmp_path / "out")
    assert status == 0, err
    warm_up_calls = 1  # then the run itself: int(strength * 1) steps of one guided UNet call each
    assert calls == ["compiled"] + ["unet"] * (warm_up_calls + int(strength * 1))
    assert "warm-up (compile/capture, once per batch shape):" in out


def test_metadata_from_makes_the_same_img2img_image_again(cli, tmp_path):
    init = tmp_path / "sketch.png"
    smooth_image(64, 64).save(init)
    assert cli("--init-img", init, "--strength", 0.6, "--sampler", "euler_a", "--seed", 5, "--n_samples", 1,
               "--outdir", tmp_path / "first")[0] == 0
    first = tmp_path / "first" / "samples" / "00000"
    status, _, err = cli("--metadata_from", first.with_suffix(".yaml"), "--outdir", tmp_path / "again")
    assert status == 0, err
    again = tmp_path / "again" / "samples" / "00000"
    assert np.array_equal(pixels(first.with_suffix(".png")), pixels(again.with_suffix(".png")))
    assert yaml.safe_load(again.with_suffix(".yaml").read_text())["strength"] == 0.6
    # a PNG records only the init image's name: --init-img names the file
    status, _, err = cli("--metadata_from", first.with_suffix(".png"), "--init-img", init, "--outdir",
                         tmp_path / "from-png")
    assert status == 0, err
    assert np.array_equal(pixels(first.with_suffix(".png")), pixels(tmp_path / "from-png" / "samples" / "00000.png"))
    other = tmp_path / "other.png"
    smooth_image(64, 64, seed=1).save(other)
    status, _, err = cli("--metadata_from", first.with_suffix(".yaml"), "--init-img", other, "--outdir",
                         tmp_path / "other")
    assert status == 0 and "is not the init image" in err and "the image will differ" in err
    status, _, err = cli("--metadata_from", first.with_suffix(".png"), "--outdir", tmp_path / "no-image")
    assert status == 2 and "which is not found here: pass it with --init-img" in err


def test_metadata_from_a_txt2img_image_names_the_script_that_made_it(cli, tmp_path):
    sidecar = tmp_path / "txt.yaml"
    sidecar.write_text("prompt: a cat\nnegative_prompt: ''\nsteps: 4\nsampler: ddim\nscale: 5.0\nseed: 1\n"
                       "H: 64\nW: 64\neta: 0.0\n")
    status, _, err = cli("--metadata_from", sidecar, "--outdir", tmp_path / "out")
    assert status == 2 and (f"{sidecar} was made by txt2img.py: make it again with scripts/txt2img.py "
                            f"--metadata_from {sidecar}") in err


# --- (d) bad input: one line, exit status 2, nothing written --------------------------------------------------------
@pytest.mark.parametrize("flags, message", [
    ((), "--init-img is required"),
    (("--init-img", "{tmp}/missing.png"), "missing.png not found"),
    (("--init-img", "{tmp}/text.png"), "is not an image PIL can read"),
    (("--init-img", "{tmp}/truncated.png"), "truncated.png cannot be read"),
    (("--init-img", "{tmp}/tiny.png"), "is 10x40, smaller than the model's 16-pixel minimum"),
    (("--init-img", "{tmp}/good.png", "--strength", "1.5"), "--strength 1.5 is outside [0, 1]"),
    (("--init-img", "{tmp}/good.png", "--strength", "nan"), "--strength nan is outside [0, 1]"),
    (("--init-img", "{tmp}/good.png", "--plms"), "img2img cannot use the plms sampler"),
    (("--init-img", "{tmp}/good.png", "--sampler", "dpm_solver"), "img2img cannot use the dpm_solver sampler"),
    (("--init-img", "{tmp}/good.png", "--laion400m"), "--laion400m selects"),
    (("--init-img", "{tmp}/good.png", "--W", "40"), "W 40 does not fit this model: sizes must be multiples of 16"),
], ids=["no-image", "missing", "not-an-image", "truncated", "too-small", "strength-high", "strength-nan", "plms",
        "dpm-solver", "laion400m", "bad-width"])
def test_bad_input_is_one_line_exit_2_and_nothing_written(cli, tmp_path, flags, message):
    (tmp_path / "text.png").write_text("not a picture")
    smooth_image(64, 64).save(tmp_path / "good.png")
    (tmp_path / "truncated.png").write_bytes((tmp_path / "good.png").read_bytes()[:200])
    smooth_image(10, 40).save(tmp_path / "tiny.png")
    outdir = tmp_path / "out"
    status, out, err = cli(*(flag.format(tmp=tmp_path) for flag in flags), "--outdir", outdir)
    assert status == 2
    assert err.count("\n") == 1 and err.startswith("img2img.py: error: ") and message in err, err
    assert "Loading model" not in out
    assert not Path(outdir).exists()
