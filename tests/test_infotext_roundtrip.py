"""Each kind of image this tool writes carries an infotext that makes it again: read the PNG back with
--metadata_from and the pixels are the same, bit for bit, and so is the infotext."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from checkpoint_factory import write_lora
from image_files import parameters, pixels

pytestmark = pytest.mark.usefixtures("one_torch_thread")

KINDS = {
    "plain": ["--sampler", "ddim"],
    "karras": ["--sampler", "DPM++ 2M", "--scheduler", "Karras"],
    "sde": ["--sampler", "dpmpp_sde"],
    "ensd and cpu rng": ["--sampler", "euler_a", "--ensd", 31337, "--rng", "cpu"],
    "nv rng": ["--sampler", "euler_a", "--rng", "nv"],
    "variation seed": ["--sampler", "euler", "--subseed", 77, "--subseed_strength", 0.4],
    "hires fix": ["--sampler", "euler", "--hr_scale", 2, "--denoising_strength", 0.6, "--hr_upscaler",
                  "Latent (nearest-exact)"],
    "clip skip": ["--sampler", "euler", "--clip_skip", 2],
    "lora tag": ["--sampler", "euler", "--prompt", "a red cube <lora:style:0.6>"],
    "weighting": ["--sampler", "euler", "--prompt", "a (red:1.3) cube BREAK blue sky", "--prompt_weighting"],
}


@pytest.mark.parametrize("kind", KINDS)
def test_an_image_is_made_again_from_its_own_infotext(kind, tiny_checkpoint, tiny_config, tmp_path, capsys,
                                                      monkeypatch):
    from ldm.cli.txt2img import main

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    state = torch.load(tiny_checkpoint, weights_only=True)["state_dict"]
    (tmp_path / "Lora").mkdir()
    write_lora(tmp_path / "Lora" / "style.safetensors", state)
    base = ["--ckpt", str(tiny_checkpoint), "--config", str(tiny_config), "--lora_dir", str(tmp_path / "Lora"),
            "--skip_grid"]
    made = ["--H", "32", "--W", "32", "--ddim_steps", "4", "--seed", "21", "--n_samples", "1", "--n_iter", "1"]
    assert main(base + made + [str(flag) for flag in KINDS[kind]] + ["--outdir", str(tmp_path / "made")]) == 0, \
        capsys.readouterr().err
    original = tmp_path / "made" / "samples" / "00000.png"
    assert main(base + ["--metadata_from", str(original), "--outdir", str(tmp_path / "again")]) == 0, \
        capsys.readouterr().err
    again = tmp_path / "again" / "samples" / "00000.png"
    assert np.array_equal(pixels(again), pixels(original)), kind
    assert parameters(again) == parameters(original)
