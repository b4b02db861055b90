"""SDXL base-to-refiner hand-off (`sample_with_refiner`, txt2img --refiner / --refiner_switch) against diffusers'
two-pipeline "ensemble of expert denoisers": StableDiffusionXLPipeline(denoising_end=switch, output_type="latent")
then StableDiffusionXLImg2ImgPipeline(image=those latents, denoising_start=switch) with the refiner, on the same
tiny weights and starting noise."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

from checkpoint_factory import TEST_CONFIGS
from image_files import pixels
from ldm.pipeline.decoding import to_uint8
from ldm.pipeline.metadata import read_png_parameters
from ldm.cli.txt2img import main
from ldm.loading import load_model
from ldm.models.diffusion.noise import ImageNoise
from ldm.models.diffusion.refiner_handoff import handoff_index, sample_with_refiner
from reference_sdxl import PROMPTS, SCALE, SCHEDULE, diffusers_parts

STEPS, SIZE = 4, 64  # 999 / (4 - 1) is whole: Euler's sigmas sit on trained timesteps 999, 666, 333, 0
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def models(tiny_xl_checkpoints) -> dict:
    return {family: load_model(path, TEST_CONFIGS / f"tiny-{family}.yaml")
            for family, path in tiny_xl_checkpoints.items()}


def conditioning(model, prompts: list[str], negative: str) -> tuple:
    size = dict(original_size=(SIZE, SIZE), target_size=(SIZE, SIZE))
    return (model.get_learned_conditioning(prompts, **size),
            model.get_unconditional_conditioning([negative] * len(prompts), **size))


def diffusers_handoff(checkpoints, vocabulary, prompts, negative, switch, x_T) -> torch.Tensor:
    def euler():
        return EulerDiscreteScheduler(timestep_spacing="linspace", **SCHEDULE)

    base = StableDiffusionXLPipeline(**diffusers_parts(checkpoints["xl"], "xl", vocabulary), scheduler=euler(),
                                     force_zeros_for_empty_prompt=True)
    parts = diffusers_parts(checkpoints["xl-refiner"], "xl-refiner", vocabulary)
    refiner = StableDiffusionXLImg2ImgPipeline(**dict(parts, text_encoder=None, tokenizer=None), scheduler=euler(),
                                               requires_aesthetics_score=True, force_zeros_for_empty_prompt=False,
                                               add_watermarker=False)
    for pipe in (base, refiner):
        pipe.set_progress_bar_config(disable=True)
    negatives = [negative] * len(prompts) if negative else None
    handed = base(prompts, negative_prompt=negatives, height=SIZE, width=SIZE, num_inference_steps=STEPS,
                  guidance_scale=SCALE, latents=x_T.clone(), denoising_end=switch, output_type="latent").images
    return refiner(prompts, negative_prompt=negatives, image=handed, num_inference_steps=STEPS,
                   guidance_scale=SCALE, denoising_start=switch, output_type="latent",
                   generator=torch.Generator().manual_seed(0)).images


def test_handoff_index_is_diffusers_discrete_cutoff():
    timesteps = torch.linspace(999, 0, 10)
    assert handoff_index(timesteps, 0.8, 1000) == 8  # cutoff 200: 999 .. 222 are the base's, 111 and 0 the refiner's
    assert handoff_index(timesteps, 0.778, 1000) == 8  # cutoff 222: on the cutoff counts as the base's
    assert handoff_index(timesteps - 2e-4, 0.778, 1000) == 8  # ... also as float error brings it back
    assert handoff_index(timesteps, 0.5, 1000) == 5
    assert handoff_index(timesteps, 0.05, 1000) == 1
    with pytest.raises(ValueError, match="strictly between 0 and 1"):
        handoff_index(timesteps, 1.0, 1000)


@pytest.mark.parametrize("switch, negative", [(0.8, ""), (0.5, "blurry, low quality")], ids=["0.8-empty", "0.5-neg"])
@torch.no_grad()
def test_same_latents_as_diffusers_two_pipeline_handoff(tiny_xl_checkpoints, hf_vocabulary, models, switch,
                                                        negative):
    x_T = torch.randn(2, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(7))
    ours = sample_with_refiner(models["xl"], models["xl-refiner"], "euler", STEPS, x_T.shape, switch,
                               conditioning(models["xl"], PROMPTS, negative),
                               conditioning(models["xl-refiner"], PROMPTS, negative), SCALE, ImageNoise([1, 2]),
                               x_T=x_T.clone(), disable=True)
    reference = diffusers_handoff(tiny_xl_checkpoints, hf_vocabulary, PROMPTS, negative, switch, x_T)
    assert ours.shape == reference.shape == (2, 4, SIZE // 8, SIZE // 8)
    # the tiny random models' latents reach |80 .. 140|: float32 rounding leaves 3e-4 (2.5e-6 of that), as between
    # diffusers' base alone and ours; a wrong split step or conditioning moves them by > 1e-2 (below)
    scale = reference.abs().max()
    assert scale > 10
    torch.testing.assert_close(ours, reference, atol=5e-6 * scale, rtol=0)

    # the refiner moved the result: the base alone over the whole schedule ends elsewhere
    from ldm.models.diffusion.samplers import sample
    alone = sample(models["xl"], "euler", STEPS, x_T.shape, *conditioning(models["xl"], PROMPTS, negative), SCALE,
                   ImageNoise([1, 2]), x_T=x_T.clone(), disable=True)
    assert (alone - ours).abs().max() > 1e-2


@pytest.fixture(scope="module")
def refiner_file(tiny_xl_checkpoints, tmp_path_factory):
    """The tiny refiner with its config beside it as `<name>.yaml`, where the loader looks first."""
    folder = tmp_path_factory.mktemp("refiner")
    path = folder / "tiny-refiner.safetensors"
    shutil.copy(tiny_xl_checkpoints["xl-refiner"], path)
    shutil.copy(TEST_CONFIGS / "tiny-xl-refiner.yaml", folder / "tiny-refiner.yaml")
    return path


def base_flags(checkpoints, tmp_path) -> list[str]:
    return ["--ckpt", str(checkpoints["xl"]), "--config", str(TEST_CONFIGS / "tiny-xl.yaml"), "--prompt", PROMPTS[1],
            "--H", str(SIZE), "--W", str(SIZE), "--ddim_steps", str(STEPS), "--n_samples", "1", "--n_iter", "1",
            "--seed", "5", "--sampler", "euler", "--scale", str(SCALE), "--precision", "full", "--skip_grid",
            "--outdir", str(tmp_path / "out")]


@torch.no_grad()
def test_cli_writes_the_library_handoff_image_and_records_the_refiner(tiny_xl_checkpoints, models, refiner_file,
                                                                      tmp_path, capsys):
    status = main(base_flags(tiny_xl_checkpoints, tmp_path) + ["--refiner", str(refiner_file),
                                                               "--refiner_switch", "0.6"])
    out, err = capsys.readouterr()
    assert status == 0, err
    assert "Loading refiner from" in out
    saved = tmp_path / "out" / "samples" / "00000.png"
    base, refiner = models["xl"], models["xl-refiner"]
    latents = sample_with_refiner(base, refiner, "euler", STEPS, (1, 4, SIZE // 8, SIZE // 8), 0.6,
                                  conditioning(base, PROMPTS[1:], ""), conditioning(refiner, PROMPTS[1:], ""), SCALE,
                                  ImageNoise([5]), disable=True)
    expected = to_uint8(base.decode_first_stage(latents))[0].astype(int)
    assert np.abs(pixels(saved).astype(int) - expected).max() <= 1
    assert np.abs(expected.std()) > 2  # an image, not a constant
    assert "Refiner: tiny-refiner, Refiner switch at: 0.6" in read_png_parameters(str(saved))


@pytest.mark.parametrize("extra, message", [
    (["--refiner_switch", "0.7"], "--refiner_switch 0.7 needs --refiner"),
    (["--refiner", "REFINER", "--refiner_switch", "1.0"], "--refiner_switch 1.0 is outside (0, 1)"),
    (["--refiner", "REFINER", "--sampler", "ddim"], "the ddim sampler cannot"),
    (["--refiner", "BASE"], "is not an SDXL refiner checkpoint (its weights are xl-base)"),
    (["--refiner", "missing.safetensors"], "--refiner missing.safetensors not found"),
    (["--refiner", "REFINER", "--ckpt", "V1", "--config", "V1CONFIG"], "needs an SDXL base checkpoint as --ckpt"),
], ids=["switch-alone", "switch-1", "ddim", "base-as-refiner", "missing", "v1-base"])
def test_cli_refuses_bad_refiner_flags_in_one_line_before_loading(tiny_xl_checkpoints, tiny_checkpoint, tiny_config,
                                                                   refiner_file, tmp_path, capsys, extra, message):
    names = {"REFINER": str(refiner_file), "BASE": str(tiny_xl_checkpoints["xl"]), "V1": str(tiny_checkpoint),
             "V1CONFIG": str(tiny_config)}
    status = main(base_flags(tiny_xl_checkpoints, tmp_path) + [names.get(flag, flag) for flag in extra])
    out, err = capsys.readouterr()
    assert status == 2
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert "Loading" not in out


def test_metadata_from_a_handoff_image_takes_its_switch(tiny_xl_checkpoints, refiner_file, tmp_path, capsys):
    assert main(base_flags(tiny_xl_checkpoints, tmp_path / "first") + ["--refiner", str(refiner_file),
                                                                        "--refiner_switch", "0.6"]) == 0
    first = tmp_path / "first" / "out" / "samples" / "00000"
    again = base_flags(tiny_xl_checkpoints, tmp_path / "again") + ["--metadata_from", str(first.with_suffix(".png"))]
    assert main(again + ["--refiner", str(refiner_file)]) == 0
    assert np.array_equal(pixels(first.with_suffix(".png")), pixels(tmp_path / "again/out/samples/00000.png"))
    capsys.readouterr()
    assert main(base_flags(tiny_xl_checkpoints, tmp_path / "base") + ["--metadata_from",
                                                                      str(first.with_suffix(".yaml"))]) == 0
    assert "was finished by the refiner tiny-refiner: pass --refiner" in capsys.readouterr().err


def test_an_sde_sampler_keeps_one_brownian_tree_across_the_handoff(models):
    """Handing off to the same model must change nothing for a single-step SDE sampler: the refiner's half draws
    from the same tree over the whole schedule, not a new tree over its half."""
    from ldm.models.diffusion.samplers import sample

    base = models["xl"]
    cond = conditioning(base, PROMPTS[:1], "")
    shape, noise_seeds = (1, 4, 8, 8), [11]
    whole = sample(base, "dpmpp_sde", 6, shape, *cond, SCALE, ImageNoise(noise_seeds))
    handed = sample_with_refiner(base, base, "dpmpp_sde", 6, shape, 0.5, cond, cond, SCALE, ImageNoise(noise_seeds))
    torch.testing.assert_close(handed, whole, rtol=1e-5, atol=1e-5)
