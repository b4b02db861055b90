"""The PNG "parameters" text and the sidecar: exact format, and both read back to the same settings."""
from __future__ import annotations

import numpy as np
import pytest
import yaml
from PIL import Image

from ldm.pipeline.metadata import (ImageRecord, encode_png, parameters_text, parse_parameters_text, read_metadata_file,
                              sampler_display_name, sidecar_text)


def record(**changes) -> ImageRecord:
    fields = dict(prompt="a cat, in a hat", negative_prompt="blurry", steps=50, sampler="ddim", scale=7.5,
                  seed=1234, H=512, W=768, eta=0.0, model="sd-v1-4", model_hash="abcdef1234", vae=None)
    fields.update(changes)
    return ImageRecord(**fields)


def test_parameters_text_has_the_widely_read_format():
    assert parameters_text(record()) == (
        "a cat, in a hat\nNegative prompt: blurry\n"
        "Steps: 50, Sampler: DDIM, CFG scale: 7.5, Seed: 1234, Size: 768x512, Model hash: abcdef1234, "
        "Model: sd-v1-4, Eta DDIM: 0, Version: latent-diffusion")
    text = parameters_text(record(negative_prompt="", sampler="euler_a", vae="kl-f8.ckpt", eta=0.25, scale=5.0))
    assert text == ("a cat, in a hat\nSteps: 50, Sampler: Euler a, CFG scale: 5, Seed: 1234, Size: 768x512, "
                    "Model hash: abcdef1234, Model: sd-v1-4, VAE: kl-f8.ckpt, Eta: 0.25, Version: latent-diffusion")


@pytest.mark.parametrize("name, shown", [("dpmpp_2m_karras", "DPM++ 2M Karras"), ("plms", "PLMS"),
                                         ("unipc", "UniPC"), ("dpm_2_ancestral", "DPM2 a"), ("new_one", "new_one")])
def test_sampler_display_names(name, shown):
    assert sampler_display_name(name) == shown


@pytest.mark.parametrize("changes", [{}, {"negative_prompt": ""}, {"prompt": "line one\nline two: with, commas"},
                                     {"model": "my, model: v2", "vae": "vae.pt", "scale": 7.123456789},
                                     {"prompt": "ünïcødé 猫", "negative_prompt": "a\nb"},
                                     {"sampler": "euler_a", "eta": None},
                                     {"lora": "style:0.8, detail:-0.5"}])
def test_parameters_text_reads_back(changes):
    original = record(**changes)
    parsed = parse_parameters_text(parameters_text(original))
    expected = original.to_mapping()
    expected["sampler"] = sampler_display_name(expected["sampler"])
    for key in ("vae", "eta", "lora"):
        if expected[key] is None:
            del expected[key]
    assert parsed == expected


def test_png_carries_the_text_and_sidecar_carries_the_same_data(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, (16, 24, 3), dtype=np.uint8)
    original = record(prompt="猫 and a dog", sampler="dpmpp_2m_karras")
    png = tmp_path / "00000.png"
    png.write_bytes(encode_png(pixels, parameters_text(original)))
    with Image.open(png) as image:
        assert image.info["parameters"] == parameters_text(original)
        assert np.array_equal(np.asarray(image), pixels)
    sidecar = tmp_path / "00000.yaml"
    sidecar.write_text(sidecar_text(original.to_mapping()), encoding="utf-8")
    assert yaml.safe_load(sidecar.read_text(encoding="utf-8")) == original.to_mapping()
    assert read_metadata_file(str(sidecar)) == original.to_mapping()
    from_png = read_metadata_file(str(png))
    assert from_png["seed"] == 1234 and from_png["sampler"] == "DPM++ 2M Karras" and from_png["W"] == 768


def test_png_without_metadata_and_bad_sidecars_are_refused(tmp_path):
    png = tmp_path / "plain.png"
    png.write_bytes(encode_png(np.zeros((8, 8, 3), np.uint8), None))
    with Image.open(png) as image:
        assert "parameters" not in image.info
    with pytest.raises(ValueError, match="no \"parameters\" text chunk"):
        read_metadata_file(str(png))
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="not an image sidecar"):
        read_metadata_file(str(tmp_path / "list.yaml"))
    with pytest.raises(ValueError, match="cannot read metadata"):
        read_metadata_file(str(tmp_path / "absent.yaml"))
