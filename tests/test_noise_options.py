"""AUTOMATIC1111's noise options through the script and the pipeline: random source, variation seeds, ENSD and
resize-seed-from, each checked by what it must equal, and recorded with AUTOMATIC1111's names."""
from __future__ import annotations

import numpy as np
import torch
import pytest

from image_files import parameters, pixels, sidecar
from ldm.modules.encoders.modules import use_clip_skip
from ldm.pipeline import Pipeline, Request, UsageError

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pipeline(tiny_checkpoint, tiny_config):
    return Pipeline.from_checkpoint(str(tiny_checkpoint), str(tiny_config), precision="full", hash_files=False)


def image(pipeline, **options) -> np.ndarray:
    settings = {"prompt": "a red circle", "steps": 3, "sampler": "euler", "height": 32, "width": 32, **options}
    return pipeline(Request(**settings)).pixels[0]


def test_a_full_strength_variation_is_the_subseeds_image(pipeline):
    assert np.array_equal(image(pipeline, seed=7, subseeds=[99], subseed_strength=1.0), image(pipeline, seed=99))
    assert np.array_equal(image(pipeline, seed=7, subseeds=[99], subseed_strength=0.0), image(pipeline, seed=7))
    halfway = image(pipeline, seed=7, subseeds=[99], subseed_strength=0.5)
    assert not np.array_equal(halfway, image(pipeline, seed=7)) and not np.array_equal(halfway, image(pipeline, seed=99))


def test_ensd_changes_only_the_noise_after_the_start(pipeline):
    assert np.array_equal(image(pipeline, seed=5, ensd=31337), image(pipeline, seed=5))  # euler draws no more noise
    ancestral = {"sampler": "euler_a", "seed": 5}
    assert not np.array_equal(image(pipeline, ensd=31337, **ancestral), image(pipeline, **ancestral))


def test_the_nv_source_draws_other_numbers_than_the_cpu_one(pipeline):
    assert not np.array_equal(image(pipeline, seed=5, rng="nv"), image(pipeline, seed=5))
    assert np.array_equal(image(pipeline, seed=5, rng="nv"), image(pipeline, seed=5, rng="nv"))


def test_resize_seed_from_the_own_size_changes_nothing(pipeline):
    assert np.array_equal(image(pipeline, seed=5, seed_resize_from=(32, 32)), image(pipeline, seed=5))
    assert not np.array_equal(image(pipeline, seed=5, seed_resize_from=(64, 48)), image(pipeline, seed=5))


def test_the_script_numbers_variation_seeds_and_records_the_options(txt2img, pipeline, tmp_path):
    status, _, err = txt2img("--seed", 7, "--subseed", 40, "--subseed_strength", 0.3, "--ensd", 31337, "--rng", "nv",
                             "--sampler", "euler_a", "--ddim_steps", 3, "--n_samples", 2, "--skip_grid",
                             outdir=tmp_path / "out")
    assert status == 0, err
    first, second = (tmp_path / "out" / "samples" / f"{index:05d}.png" for index in range(2))
    assert [sidecar(path)["seed"] for path in (first, second)] == [7, 7]
    assert [sidecar(path)["subseed"] for path in (first, second)] == [40, 41]
    text = parameters(second)
    for field in ("Seed: 7", "Variation seed: 41", "Variation seed strength: 0.3", "ENSD: 31337", "RNG: NV"):
        assert field in text, field
    expected = pipeline(Request("a painting of a virus monster playing guitar", seeds=[7, 7], subseeds=[40, 41],
                                subseed_strength=0.3, ensd=31337, rng="nv", steps=3, sampler="euler_a", height=32,
                                width=32, scale=7.5))
    assert np.array_equal(expected.pixels[1], pixels(second))


@pytest.mark.parametrize("options, message", [
    ({"rng": "quantum"}, "rng 'quantum' is not one of"),
    ({"subseed_strength": 0.5}, "needs subseeds"),
    ({"subseeds": [1, 2], "subseed_strength": 0.5}, "2 subseeds for 1 images"),
    ({"subseeds": [1], "subseed_strength": 1.5}, "outside \\[0, 1\\]"),
])
def test_bad_noise_options_are_one_line(options, message):
    with pytest.raises(UsageError, match=message):
        Request("a cat", **options)


def test_a_variation_strength_without_a_subseed_is_refused(txt2img, tmp_path):
    status, _, err = txt2img("--subseed_strength", 0.5, outdir=tmp_path / "out")
    assert status == 2 and "--subseed_strength needs --subseed" in err and not (tmp_path / "out").exists()


def test_clip_skip_reads_the_penultimate_layer_and_is_recorded(txt2img, pipeline, tmp_path):
    skipped = image(pipeline, seed=5, clip_skip=2)
    assert not np.array_equal(skipped, image(pipeline, seed=5))
    with use_clip_skip(pipeline.model, 2):  # the same as setting the encoder by hand around a plain request
        assert np.array_equal(skipped, image(pipeline, seed=5))
    status, _, err = txt2img("--clip_skip", 2, "--seed", 5, "--sampler", "euler", "--ddim_steps", 3, "--prompt",
                             "a red circle", "--skip_grid", outdir=tmp_path / "out")
    assert status == 0, err
    saved = tmp_path / "out" / "samples" / "00000.png"
    assert "Clip skip: 2" in parameters(saved) and np.array_equal(pixels(saved), skipped)


def test_a_model_that_ignores_clip_skip_says_so(tiny_checkpoints, tmp_path, capsys):
    from checkpoint_factory import TEST_CONFIGS
    from ldm.cli.txt2img import main

    flags = ["--ckpt", str(tiny_checkpoints["v2", ".ckpt"]), "--config", str(TEST_CONFIGS / "tiny-v2.yaml"),
             "--H", "32", "--W", "32", "--ddim_steps", "2", "--n_samples", "1", "--n_iter", "1", "--clip_skip", "2",
             "--outdir", str(tmp_path / "out"), "--skip_grid"]
    assert main(flags) == 0
    assert "this model ignores clip skip, as AUTOMATIC1111 does for SD 2.x and SDXL" in capsys.readouterr().err


def test_img2img_draws_its_encoding_noise_from_any_source(tiny_checkpoint, tiny_config):
    """The nv source has no torch.Generator: the encoded image's sample comes from the image's own stream instead,
    and for the cpu source that stream's numbers are the generator's (so both routes agree)."""
    from PIL import Image

    from ldm.models.diffusion.noise import ImageNoise
    from ldm.models.diffusion.samplers import encoded_latents
    from ldm.pipeline import InitImage
    from ldm.pipeline.addons.init_image import encode_image
    from ldm.pipeline.images import image_to_tensor

    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    addon = InitImage(image, strength=0.5)
    pipeline = Pipeline.from_checkpoint(str(tiny_checkpoint), str(tiny_config), precision="full", hash_files=False,
                                        addons=[addon])
    made = pipeline(Request("a cat", seed=3, steps=4, sampler="euler", height=32, width=32, rng="nv"))
    assert made.pixels.shape == (1, 32, 32, 3)
    posterior = encode_image(pipeline.model, image_to_tensor(image, 32, 32))
    noise = ImageNoise([3, 4])
    by_generator = encoded_latents(pipeline.model, posterior, noise)
    draws = ImageNoise([3, 4]).stream_randn((2, *posterior.mean.shape[1:]))
    by_stream = (pipeline.model.scale_factor * (posterior.mean + posterior.std * draws)).float()
    assert torch.equal(by_generator, by_stream)
