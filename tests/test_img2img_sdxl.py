"""SDXL img2img (base and refiner): `sample_img2img` and scripts/img2img.py against diffusers'
StableDiffusionXLImg2ImgPipeline on the same weights, init image and per-image generators.

diffusers' defaults are ours: size conditioning original = target = the init image's size (height, width), crop
(0, 0); the base makes an empty negative prompt zeros (force_zeros_for_empty_prompt), the refiner encodes it and
conditions on aesthetic scores 6.0 / 2.5 (requires_aesthetics_score, as the released refiner's model_index.json
sets both); strength runs the last int(strength * steps) steps. Euler is compared with the unmodified pipeline; DDIM
gives diffusers' scheduler CompVis' noising, one DDIM step above the first step run (see tests/test_img2img.py):
there the two conventions differ by design and ours stays CompVis' (unmodified, the base's latents differ by ~0.75).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline
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
from ldm.models.diffusion.samplers import sample_img2img
from reference_sd import CompVisNoisingDDIM
from reference_sdxl import PROMPTS, SCALE, SCHEDULE, diffusers_parts
from smooth_inputs import smooth_image

STEPS, SEEDS = 10, [5, 6]  # 999 / (10 - 1) is whole (Euler's sigmas on trained timesteps); 10 divides 1000 (DDIM)
WIDTH, HEIGHT = 128, 64  # not square, so (height, width) order in the size conditioning shows
STRENGTH = {"xl": 0.75, "xl-refiner": 0.3}  # the refiner is used on a finished image, lightly
NEGATIVE = "blurry, low quality"


@pytest.fixture(scope="module")
def models(tiny_xl_checkpoints) -> dict:
    return {family: load_model(path, TEST_CONFIGS / f"tiny-{family}.yaml")
            for family, path in tiny_xl_checkpoints.items()}


def euler() -> EulerDiscreteScheduler:
    return EulerDiscreteScheduler(timestep_spacing="linspace", **SCHEDULE)


def compvis_ddim() -> CompVisNoisingDDIM:
    return CompVisNoisingDDIM(clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
                              **SCHEDULE)


def diffusers_img2img(checkpoint: Path, family: str, vocabulary: Path, scheduler) -> StableDiffusionXLImg2ImgPipeline:
    """diffusers' SDXL img2img pipeline on our weights, configured as the released base / refiner folders are."""
    parts, refiner = diffusers_parts(checkpoint, family, vocabulary), family == "xl-refiner"
    if refiner:
        parts.update(text_encoder=None, tokenizer=None)
    pipe = StableDiffusionXLImg2ImgPipeline(**parts, scheduler=scheduler, requires_aesthetics_score=refiner,
                                            force_zeros_for_empty_prompt=not refiner, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def our_img2img(model, sampler: str, image: Image.Image, prompts: list[str], negative: str, strength: float,
                seeds=SEEDS, steps=STEPS, **conditioning) -> torch.Tensor:
    """The library path the CLI takes: per-seed posterior sample and noise; size conditioning (H, W) of the image
    unless `conditioning` (get_learned_conditioning's keywords) says otherwise."""
    conditioning = {"original_size": (image.height, image.width), "target_size": (image.height, image.width),
                    **conditioning}
    noise = ImageNoise(seeds)
    x_init = init_latents(model, encode_init_image(model, image_to_tensor(image, *image.size)), noise)
    cond = model.get_learned_conditioning(prompts, **conditioning)
    conditioning.pop("aesthetic_score", None)  # the negative half keeps its own score
    uncond = model.get_unconditional_conditioning([negative] * len(prompts), **conditioning)
    return sample_img2img(model, sampler, steps, x_init, strength, cond, uncond, SCALE, noise, disable=True)


def reference_latents(pipe, image: Image.Image, prompts: list[str], negative: str, strength: float, seeds=SEEDS,
                      steps=STEPS) -> torch.Tensor:
    """diffusers' final latents; an empty negative prompt is passed as None, diffusers' way of giving none."""
    return pipe(prompts, image=image, strength=strength, negative_prompt=[negative] * len(prompts) if negative else
                None, num_inference_steps=steps, guidance_scale=SCALE, output_type="latent",
                generator=[torch.Generator().manual_seed(seed) for seed in seeds]).images


@pytest.mark.parametrize("family, sampler, scheduler, negative", [
    ("xl", "euler", euler, ""),
    ("xl", "euler", euler, NEGATIVE),
    ("xl", "ddim", compvis_ddim, ""),
    ("xl-refiner", "euler", euler, ""),
    ("xl-refiner", "euler", euler, NEGATIVE),
    ("xl-refiner", "ddim", compvis_ddim, NEGATIVE),
], ids=["base-euler-empty", "base-euler-negative", "base-ddim-empty", "refiner-euler-empty",
        "refiner-euler-negative", "refiner-ddim-negative"])
@torch.no_grad()
def test_same_latents_and_images_as_diffusers_sdxl_img2img(tiny_xl_checkpoints, hf_vocabulary, models, family,
                                                           sampler, scheduler, negative):
    model, image, strength = models[family], smooth_image(WIDTH, HEIGHT), STRENGTH[family]
    ours = our_img2img(model, sampler, image, PROMPTS, negative, strength)
    pipe = diffusers_img2img(tiny_xl_checkpoints[family], family, hf_vocabulary, scheduler())
    reference = reference_latents(pipe, image, PROMPTS, negative, strength)
    assert ours.shape == reference.shape == (2, 4, HEIGHT // 8, WIDTH // 8)
    assert (reference[0] - reference[1]).abs().max() > 0.01  # each image has its own seed and prompt
    torch.testing.assert_close(ours, reference, atol=1e-4, rtol=1e-5)  # the tiny base's latents reach |25|

    decoded = pipe.vae.decode(reference / pipe.vae.config.scaling_factor).sample
    torch.testing.assert_close(((model.decode_first_stage(ours) + 1) / 2).clamp(0, 1),
                               ((decoded + 1) / 2).clamp(0, 1), atol=1e-4, rtol=0)


@torch.no_grad()
def test_conditioning_defaults_are_what_moves_the_image(tiny_xl_checkpoints, hf_vocabulary, models):
    """The comparison above can fail: the refiner's latents follow the aesthetic score (diffusers' 7.0 is ours with
    7.0, not our 6.0 default), and the base's follow the size it is conditioned on, in (height, width) order."""
    image = smooth_image(WIDTH, HEIGHT)
    refiner = models["xl-refiner"]
    pipe = diffusers_img2img(tiny_xl_checkpoints["xl-refiner"], "xl-refiner", hf_vocabulary, euler())
    reference = pipe(PROMPTS, image=image, strength=0.3, num_inference_steps=STEPS, guidance_scale=SCALE,
                     output_type="latent", aesthetic_score=7.0,
                     generator=[torch.Generator().manual_seed(seed) for seed in SEEDS]).images
    assert (our_img2img(refiner, "euler", image, PROMPTS, "", 0.3) - reference).abs().max() > 1e-3
    scored = our_img2img(refiner, "euler", image, PROMPTS, "", 0.3, aesthetic_score=7.0)
    torch.testing.assert_close(scored, reference, atol=1e-4, rtol=0)

    base = models["xl"]
    sized = our_img2img(base, "euler", image, PROMPTS, "", 0.75)
    for wrong in ((WIDTH, HEIGHT), (1024, 1024)):
        other = our_img2img(base, "euler", image, PROMPTS, "", 0.75, original_size=wrong, target_size=wrong)
        assert (other - sized).abs().max() > 1e-3


@torch.no_grad()
def test_cli_refiner_images_are_the_library_and_diffusers_images(tiny_xl_checkpoints, hf_vocabulary, models,
                                                                 tmp_path, capsys):
    init = tmp_path / "base-image.png"
    smooth_image(WIDTH + 2, HEIGHT + 6, seed=3).save(init)  # both resize it (LANCZOS) to WIDTH x HEIGHT
    prompt = "a lighthouse at dusk, detailed"
    status = main(["--ckpt", str(tiny_xl_checkpoints["xl-refiner"]), "--config",
                   str(TEST_CONFIGS / "tiny-xl-refiner.yaml"), "--init-img", str(init), "--strength", "0.5",
                   "--prompt", prompt, "--sampler", "euler", "--ddim_steps", str(STEPS), "--scale", str(SCALE),
                   "--seed", "42", "--n_samples", "2", "--precision", "full", "--skip_grid",
                   "--outdir", str(tmp_path / "out")])
    assert status == 0, capsys.readouterr().err
    saved = [pixels(tmp_path / "out" / "samples" / f"0000{index}.png").astype(int) for index in range(2)]
    assert saved[0].shape == (HEIGHT, WIDTH, 3)

    image = Image.open(init).convert("RGB")
    resized = image.resize((WIDTH, HEIGHT), resample=Image.LANCZOS)
    latents = our_img2img(models["xl-refiner"], "euler", resized, [prompt] * 2, "", 0.5, seeds=[42, 43])
    expected = to_uint8(models["xl-refiner"].decode_first_stage(latents)).astype(int)
    for index in range(2):
        assert np.abs(saved[index] - expected[index]).max() <= 1
    assert np.abs(saved[0] - saved[1]).max() > 2  # seeds 42 and 43 differ

    pipe = diffusers_img2img(tiny_xl_checkpoints["xl-refiner"], "xl-refiner", hf_vocabulary, euler())
    reference = pipe([prompt] * 2, image=image, strength=0.5, num_inference_steps=STEPS, guidance_scale=SCALE,
                     output_type="np", generator=[torch.Generator().manual_seed(seed) for seed in (42, 43)]).images
    truncated = np.floor(reference * 255).astype(int)  # the CLI truncates 255 x, as CompVis' script does
    for index in range(2):
        assert np.abs(saved[index] - truncated[index]).max() <= 1
