"""An AUTOMATIC1111 infotext pasted into --metadata_from: every field applied or named as ignored, the image the same
explicit flags make, a flag given on the command line winning, missing LoRAs named with their hashes."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from checkpoint_factory import write_lora
from image_files import parameters, pixels
from ldm.cli.txt2img import main
from ldm.pipeline.metadata import encode_png, parse_parameters_text

pytestmark = pytest.mark.usefixtures("one_torch_thread")

INFOTEXT = """a red circle <lora:style:0.8>, (sharp:1.2)
Negative prompt: blurry
Steps: 3, Sampler: Euler a, CFG scale: 6, Seed: 12, Size: 32x32, Model hash: 0123456789, Model: tiny-v1, \
Variation seed: 5, Variation seed strength: 0.25, Clip skip: 2, ENSD: 31337, Face restoration: CodeFormer, \
Lora hashes: "style: abcdef012345", Token merging ratio: 0.5, Version: v1.10.0"""


@pytest.fixture
def setup(tmp_path, tiny_checkpoint, tiny_config, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    state = torch.load(tiny_checkpoint, weights_only=True)["state_dict"]
    (tmp_path / "Lora").mkdir()
    write_lora(tmp_path / "Lora" / "style.safetensors", state)
    image = tmp_path / "civitai.png"
    image.write_bytes(encode_png(np.zeros((32, 32, 3), dtype=np.uint8), INFOTEXT))
    base = ["--ckpt", str(tiny_checkpoint), "--config", str(tiny_config), "--skip_grid", "--lora_dir",
            str(tmp_path / "Lora")]
    return base, image


def run(flags, capsys):
    status = main([str(flag) for flag in flags])
    return status, capsys.readouterr().err


def test_the_fields_are_read_with_automatic1111s_names():
    fields = parse_parameters_text(INFOTEXT)
    assert (fields["steps"], fields["sampler"], fields["scale"], fields["seed"], fields["W"], fields["H"]) == (
        3, "Euler a", 6.0, 12, 32, 32)
    assert (fields["subseed"], fields["subseed_strength"], fields["clip_skip"], fields["ensd"]) == (5, 0.25, 2, 31337)
    assert fields["lora_hashes"] == "style: abcdef012345" and fields["version"] == "v1.10.0"
    assert fields["ignored_fields"] == "Face restoration, Token merging ratio"


def test_an_infotext_makes_the_image_the_same_flags_make(setup, tmp_path, capsys):
    base, image = setup
    status, err = run(base + ["--metadata_from", image, "--outdir", tmp_path / "pasted"], capsys)
    assert status == 0, err
    assert "not applied, as this tool has no such setting: Face restoration, Token merging ratio" in err
    assert "emulated (--rng nv)" in err or torch.cuda.is_available()
    status, err = run(base + ["--prompt", "a red circle <lora:style:0.8>, (sharp:1.2)", "--negative_prompt", "blurry",
                              "--ddim_steps", 3, "--sampler", "Euler a", "--scale", 6, "--seed", 12, "--H", 32,
                              "--W", 32, "--subseed", 5, "--subseed_strength", 0.25, "--clip_skip", 2, "--ensd",
                              31337, "--rng", "gpu" if torch.cuda.is_available() else "nv", "--prompt_weighting",
                              "--n_samples", 1, "--n_iter", 1, "--outdir", tmp_path / "flags"], capsys)
    assert status == 0, err
    pasted, flagged = (tmp_path / name / "samples" / "00000.png" for name in ("pasted", "flags"))
    assert np.array_equal(pixels(pasted), pixels(flagged))
    written = parse_parameters_text(parameters(pasted))
    for key in ("steps", "seed", "scale", "subseed", "subseed_strength", "clip_skip", "ensd"):
        assert written[key] == parse_parameters_text(INFOTEXT)[key], key


def test_a_flag_wins_over_the_infotext(setup, tmp_path, capsys):
    base, image = setup
    status, err = run(base + ["--metadata_from", image, "--seed", 99, "--outdir", tmp_path / "out"], capsys)
    assert status == 0, err
    assert "Seed: 99," in parameters(tmp_path / "out" / "samples" / "00000.png")


def test_missing_loras_are_named_with_their_hashes(setup, tmp_path, capsys):
    base, image = setup
    (tmp_path / "Lora" / "style.safetensors").unlink()
    status, err = run(base + ["--metadata_from", image, "--outdir", tmp_path / "out"], capsys)
    assert status == 2 and f"needs LoRA files not found in {tmp_path / 'Lora'}: style (hash abcdef012345)" in err
    assert not (tmp_path / "out").exists()


def test_a_text_file_holding_the_infotext_works_as_the_png(setup, tmp_path, capsys):
    base, image = setup
    (tmp_path / "copied.txt").write_text(INFOTEXT + "\n", encoding="utf-8")
    assert run(base + ["--metadata_from", image, "--outdir", tmp_path / "png"], capsys)[0] == 0
    assert run(base + ["--metadata_from", tmp_path / "copied.txt", "--outdir", tmp_path / "txt"], capsys)[0] == 0
    assert np.array_equal(pixels(tmp_path / "png" / "samples" / "00000.png"),
                          pixels(tmp_path / "txt" / "samples" / "00000.png"))


@pytest.mark.parametrize("suffix", [".jpg", ".webp"])
def test_an_infotext_in_a_jpeg_or_webp_exif_comment_is_read(setup, tmp_path, capsys, suffix):
    """AUTOMATIC1111 saves JPEG and WebP images with the text in EXIF UserComment ("UNICODE" + UTF-16 big-endian)."""
    from PIL import Image

    base, image = setup
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\0" + INFOTEXT.encode("utf-16-be")
    Image.new("RGB", (32, 32)).save(tmp_path / f"shared{suffix}", exif=exif.tobytes())
    assert run(base + ["--metadata_from", image, "--outdir", tmp_path / "png"], capsys)[0] == 0
    status, err = run(base + ["--metadata_from", tmp_path / f"shared{suffix}", "--outdir", tmp_path / "exif"], capsys)
    assert status == 0, err
    assert np.array_equal(pixels(tmp_path / "png" / "samples" / "00000.png"),
                          pixels(tmp_path / "exif" / "samples" / "00000.png"))
