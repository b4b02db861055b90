"""`--unet`: UNet-only files (SDXL-Lightning's and Hyper-SD's `*_unet.safetensors`, in diffusers' names) and UNets in
the released names or diffusers folders replace the checkpoint's UNet exactly; the file's name picks the few-step
preset and is recorded; files that are not a fitting UNet are refused in one line."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from checkpoint_factory import TEST_CONFIGS, make_tiny_xl_checkpoint, write_checkpoint
from PIL import Image
from reference_sdxl import diffusers_parts

from ldm.checkpoints import read_checkpoint
from ldm.cli.txt2img import main
from ldm.loading import LoadError, load_model

UNET = "model.diffusion_model."


@pytest.fixture(scope="module")
def files(tmp_path_factory, hf_vocabulary) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("unet-files")
    base = make_tiny_xl_checkpoint(root / "base.safetensors", "xl", seed=3)
    other = make_tiny_xl_checkpoint(root / "other.safetensors", "xl", seed=6)
    unet = diffusers_parts(other, "xl", hf_vocabulary)["unet"]
    weights, _ = read_checkpoint(other)
    made = {"base": base, "other": other,
            "diffusers": write_checkpoint({key: value.contiguous() for key, value in unet.state_dict().items()},
                                          root / "sdxl_lightning_2step_unet.safetensors"),
            "released": write_checkpoint({key: value for key, value in weights.items() if key.startswith(UNET)},
                                         root / "released_unet.safetensors"),
            "bare": write_checkpoint({key.removeprefix(UNET): value for key, value in weights.items()
                                      if key.startswith(UNET)}, root / "bare_unet.safetensors"),
            "vae-only": write_checkpoint({key: value for key, value in weights.items()
                                          if key.startswith("first_stage_model.")}, root / "vae.safetensors")}
    unet.save_pretrained(root / "unet-folder")
    made["folder"] = root / "unet-folder"
    return made


def _parts(model: torch.nn.Module) -> tuple[dict, dict]:
    state = model.state_dict()
    return ({key: value for key, value in state.items() if key.startswith(UNET)},
            {key: value for key, value in state.items() if not key.startswith(UNET)})


@pytest.mark.parametrize("form", ["diffusers", "released", "bare", "folder"])
def test_unet_file_replaces_the_checkpoints_unet(files, form):
    model = load_model(files["base"], TEST_CONFIGS / "tiny-xl.yaml", unet=files[form])
    unet, rest = _parts(model)
    other_unet, _ = _parts(load_model(files["other"], TEST_CONFIGS / "tiny-xl.yaml"))
    _, base_rest = _parts(load_model(files["base"], TEST_CONFIGS / "tiny-xl.yaml"))
    assert unet.keys() == other_unet.keys() and rest.keys() == base_rest.keys()
    for key, value in unet.items():
        assert torch.equal(value, other_unet[key]), key
    for key, value in rest.items():
        assert torch.equal(value, base_rest[key]), key


def test_lightning_unet_file_picks_its_preset_and_is_recorded(files, tmp_path, capsys):
    outdir = tmp_path / "out"
    status = main(["--ckpt", str(files["base"]), "--config", str(TEST_CONFIGS / "tiny-xl.yaml"), "--unet",
                   str(files["diffusers"]), "--prompt", "a lighthouse", "--H", "64", "--W", "64", "--n_samples", "1",
                   "--n_iter", "1", "--outdir", str(outdir), "--skip_grid"])
    err = capsys.readouterr().err
    assert status == 0, err
    assert "SDXL-Lightning" in err
    saved = sorted((outdir / "samples").glob("*.png"))
    text = Image.open(saved[0]).text["parameters"]
    assert "UNet: sdxl_lightning_2step_unet.safetensors" in text and "Steps: 2" in text
    assert "Schedule type: Trailing" in text and "Sampler: Euler," in text


def test_what_is_not_a_fitting_unet_is_refused_in_one_line(files, tiny_checkpoints, tmp_path, capsys):
    with pytest.raises(LoadError, match="--unet .* holds no UNet weights"):
        load_model(files["base"], TEST_CONFIGS / "tiny-xl.yaml", unet=files["vae-only"])
    sd1_unet = tiny_checkpoints["v1", ".safetensors"]
    for unet, message in ((files["vae-only"], "holds no UNet weights"), (sd1_unet, "does not fit"),
                          (tmp_path / "missing_unet.safetensors", "--unet")):
        status = main(["--ckpt", str(files["base"]), "--config", str(TEST_CONFIGS / "tiny-xl.yaml"), "--unet",
                       str(unet), "--prompt", "x", "--outdir", str(tmp_path / "out"), "--ddim_steps", "1"])
        err = capsys.readouterr().err.strip()
        assert status == 2 and message in err and len(err.splitlines()) == 1, err
