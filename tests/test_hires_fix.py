"""AUTOMATIC1111's hires fix: a first pass at the asked size, an upscale (latent or pixel), a second img2img pass at
the larger size; the script and the Python add-on make the same pixels, and the pieces compose as stated."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from image_files import parameters, pixels, sidecar
from ldm.pipeline import HiresFix, Pipeline, Request, UsageError
from ldm.pipeline.decoding import to_uint8

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def plain(tiny_checkpoint, tiny_config):
    return Pipeline.from_checkpoint(str(tiny_checkpoint), str(tiny_config), precision="full", hash_files=False)


def test_the_script_makes_a_larger_image_and_records_the_hires_fields(txt2img, tiny_checkpoint, tiny_config,
                                                                      tmp_path):
    status, _, err = txt2img("--hr_scale", 2, "--denoising_strength", 0.5, "--sampler", "euler_a", "--ddim_steps", 4,
                             "--skip_grid", outdir=tmp_path / "out")
    assert status == 0, err
    saved = tmp_path / "out" / "samples" / "00000.png"
    assert pixels(saved).shape == (64, 64, 3)
    text = parameters(saved)
    assert "Size: 32x32" in text and "Denoising strength: 0.5, Hires upscale: 2, Hires upscaler: Latent" in text
    assert sidecar(saved)["hr_scale"] == 2.0 and sidecar(saved)["hr_upscaler"] == "Latent"
    addon = HiresFix(2.0, "Latent", 0, 0.5)
    pipeline = Pipeline.from_checkpoint(str(tiny_checkpoint), str(tiny_config), addons=[addon], hash_files=False)
    result = pipeline(Request("a painting of a virus monster playing guitar", seed=42, steps=4, sampler="euler_a",
                              height=32, width=32))
    assert np.array_equal(result.pixels[0], pixels(saved))


@pytest.mark.parametrize("upscaler", ["Latent (nearest)", "Latent (bicubic antialiased)"])
def test_with_no_denoising_the_image_is_the_upscaled_first_pass(plain, tiny_checkpoint, tiny_config, upscaler):
    request = Request("a cat", seed=3, steps=3, sampler="euler", height=32, width=32)
    first = plain(request).latents
    mode, antialias = {"Latent (nearest)": ("nearest", False), "Latent (bicubic antialiased)": ("bicubic", True)}[
        upscaler]
    with torch.no_grad():
        expected = to_uint8(plain.model.decode_first_stage(F.interpolate(first, size=(8, 8), mode=mode,
                                                                         antialias=antialias)))
    hires = Pipeline.from_checkpoint(str(tiny_checkpoint), str(tiny_config), precision="full", hash_files=False,
                                     addons=[HiresFix(2.0, upscaler, 0, 0.0)])
    assert np.array_equal(hires(request).pixels, expected)


def test_a_pixel_upscaler_decodes_resizes_and_encodes(tiny_checkpoint, tiny_config):
    hires = Pipeline.from_checkpoint(str(tiny_checkpoint), str(tiny_config), precision="full", hash_files=False,
                                     addons=[HiresFix(1.0, "lanczos", 2, 0.6, resize_x=64)])
    result = hires(Request("a cat", seed=3, steps=3, sampler="euler", height=32, width=32))
    assert result.pixels.shape == (1, 64, 64, 3) and result.steps == 3 + 2
    assert ("Hires resize", "64x0") in result.records[0].extra_parameters()


@pytest.mark.parametrize("resize, size, expected", [
    # AUTOMATIC1111's calculate_target_resolution, worked by hand: (height, width, crop rows, crop columns)
    ((0, 0), (512, 768), (1024, 1536, 0, 0)),
    ((1024, 0), (512, 768), (682, 1024, 0, 0)),
    ((0, 1024), (512, 768), (1024, 1536, 0, 0)),
    ((1024, 1024), (512, 768), (1024, 1536, 0, 64)),
    ((1536, 512), (512, 512), (1536, 1536, 128, 0)),
])
def test_target_sizes_follow_automatic1111(resize, size, expected):
    assert HiresFix(2.0, resize_x=resize[0], resize_y=resize[1]).target(*size, 8) == expected


@pytest.mark.parametrize("kwargs, message", [
    ({"upscaler": "R-ESRGAN 4x+"}, "is not one this tool has"),
    ({"scale": 0.5}, "outside \\[1, 8\\]"),
    ({"denoising_strength": 1.5}, "outside \\[0, 1\\]"),
])
def test_bad_hires_settings_are_one_line(kwargs, message):
    with pytest.raises(UsageError, match=message):
        HiresFix(**kwargs)


def test_the_script_refuses_a_target_the_model_cannot_take(txt2img, tmp_path):
    status, _, err = txt2img("--hr_scale", 1.5, outdir=tmp_path / "out")
    assert status == 2 and "the hires fix makes 48x48 images from 32x32" in err and not (tmp_path / "out").exists()
