"""AUTOMATIC1111's noise options through the script and the pipeline: random source, variation seeds, ENSD and
resize-seed-from, each checked by what it must equal, and recorded with AUTOMATIC1111's names."""
from __future__ import annotations

import numpy as np
import pytest

from image_files import parameters, pixels, sidecar
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
