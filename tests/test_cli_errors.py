"""Every bad input: one clear line on stderr, exit status 2 (1 for failures while generating), nothing written."""
from __future__ import annotations

import pytest
import torch

from ldm.cli.txt2img import main

SIZE = 32
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def failing_cli(tiny_checkpoint, tiny_config, tmp_path, capsys):
    """failing_cli(*flags, status=2) -> the one error line, after checking the status and that nothing was written."""
    def run(*flags, status=2, ckpt=None, config=None):
        out = tmp_path / "out"
        argv = ["--ckpt", str(ckpt or tiny_checkpoint), "--config", str(config or tiny_config), "--H", str(SIZE),
                "--W", str(SIZE), "--ddim_steps", "2", "--n_samples", "1", "--n_iter", "1", "--outdir", str(out)]
        if config == "none":
            argv.remove("--config"), argv.remove("none")
        got = main(argv + [str(flag) for flag in flags])
        err = capsys.readouterr().err
        assert got == status, err
        assert "Traceback" not in err
        errors = [line for line in err.splitlines() if "error:" in line]
        assert len(errors) == 1 and errors[0] == err.strip().splitlines()[-1], err
        assert not out.exists(), "a failed run wrote files"
        return errors[0]
    return run


def write(tmp_path, name, data: bytes):
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("flags, message", [
    (["--H", 36], "flags: H 36 is not a positive multiple of 8: try 32 or 40"),
    (["--W", 0], "W 0 is not a positive multiple of 8"),
    (["--H", 40], "H 40 does not fit this model: sizes must be multiples of 16 (autoencoder 8x, UNet 2x): try 32 or 48"),
    (["--seed", -1], "--seed: seed -1 is out of range: seeds must lie in 0..4294967295"),
    (["--seed", 2**32 - 1, "--n_samples", 2], "seed 4294967295 gives a later image the seed 4294967296, out of range"),
    (["--sampler", "eulerr"], "unknown sampler 'eulerr'; available: euler, euler_a,"),
    (["--plms", "--ddim_eta", 0.5], "plms is deterministic and takes no eta (got 0.5): use --ddim_eta 0"),
    (["--plms", "--sampler", "ddim"], "--sampler ddim contradicts --plms"),
    (["--ddim_steps", 3], "ddim cannot take 3 steps on this 1000-step model"),
    (["--ddim_steps", 0], "steps 0 is out of range: use 1..1000"),
    (["--n_samples", 0], "--n_samples 0 is too small: it must be at least 1"),
    (["--f", 4], "--f 4 does not match this model, whose autoencoder downsamples by 8: pass --f 8"),
    (["--C", 3], "--C 3 does not match this model's 4 latent channels: pass --C 4"),
    (["--precision", "half"], "argument --precision: invalid choice: 'half'"),
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["--vae", "missing.vae.pt"], "--vae missing.vae.pt not found"),
    (["--safety_checker", "no/such/folder"], "--safety_checker no/such/folder is not a folder"),
    (["--ddim_eta", -1], "eta -1.0 must be a number >= 0"),
])
def test_bad_flags(failing_cli, flags, message):
    assert message in failing_cli(*flags)


def test_missing_checkpoint_says_where_it_goes_and_what_fits(failing_cli, tmp_path):
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "sd-v1-5.safetensors").write_bytes(b"")
    line = failing_cli(ckpt=tmp_path / "models" / "model.ckpt")
    assert "checkpoint " + str(tmp_path / "models" / "model.ckpt") + " not found" in line
    assert "models/ldm/stable-diffusion-v1" in line and ".safetensors" in line
    assert "found in " + str(tmp_path / "models") + ": sd-v1-5.safetensors (pass one with --ckpt)" in line
    assert "models/ldm/text2img-large/model.ckpt not found" in failing_cli("--laion400m")


def test_config_and_checkpoint_that_do_not_match(failing_cli, tiny_config):
    line = failing_cli(config=tiny_config.parent / "tiny-v2.yaml")
    assert "the checkpoint does not fit config tiny-v2.yaml" in line and "SD 1.x checkpoint" in line
    assert "config nowhere.yaml does not exist" in failing_cli(config="nowhere.yaml")


def test_not_a_checkpoint(failing_cli, tmp_path):
    line = failing_cli(ckpt=write(tmp_path, "notes.ckpt", b"hello, not weights"), config="none")
    assert "notes.ckpt is not a checkpoint" in line


@pytest.mark.parametrize("content, message", [
    (b"fine\ncaf\xe9\n", "is not UTF-8 (byte 0xe9 on line 2): save it as UTF-8"),
    (b"# nothing but comments\n\n", "has no prompts"),
    (b'a\nb\n{"prompt": "c", "seed": 1,}\n', "prompts.txt line 3: malformed JSON"),
    (b'{"prompt": "c", "H": 36}\n', "prompts.txt line 1: H 36 is not a positive multiple of 8"),
    (b'{"prompt": "c", "seed": -5}\n', "prompts.txt line 1: seed -5 is out of range"),
    (b'{"prompt": "c", "sampler": "nope"}\n', "prompts.txt line 1: unknown sampler 'nope'"),
])
def test_bad_prompt_files(failing_cli, tmp_path, content, message):
    assert message in failing_cli("--from-file", write(tmp_path, "prompts.txt", content))


def test_unreadable_inputs(failing_cli, tmp_path):
    assert "prompt file " + str(tmp_path / "absent.txt") + " does not exist" in failing_cli(
        "--from-file", tmp_path / "absent.txt")
    assert "is not an image sidecar" in failing_cli("--metadata_from", write(tmp_path, "x.yaml", b"[1, 2]"))
    assert "--metadata_from and --from-file exclude each other" in failing_cli(
        "--metadata_from", write(tmp_path, "y.yaml", b"prompt: a"), "--from-file", tmp_path / "y.yaml")


def test_outdir_that_is_a_file(tiny_checkpoint, tiny_config, tmp_path, capsys):
    target = write(tmp_path, "taken", b"a file")
    assert main(["--ckpt", str(tiny_checkpoint), "--config", str(tiny_config), "--outdir", str(target)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err and target.read_bytes() == b"a file"


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_unavailable_device(failing_cli):
    assert "no CUDA GPU: use --device cpu" in failing_cli("--device", "cuda")


def test_optional_packages_missing(failing_cli, monkeypatch, tmp_path):
    import sys

    monkeypatch.setitem(sys.modules, "imwatermark", None)  # None in sys.modules makes the import fail
    assert "--watermark needs the invisible-watermark package: pip install invisible-watermark" in failing_cli(
        "--watermark")
    # None in sys.modules makes the import fail, also when other tests imported diffusers already
    monkeypatch.setitem(sys.modules, "diffusers.pipelines.stable_diffusion.safety_checker", None)
    (tmp_path / "checker").mkdir()
    assert "--safety_checker needs the diffusers and transformers packages" in failing_cli(
        "--safety_checker", tmp_path / "checker")


def test_help_lists_every_flag_with_its_default(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    flags = ["--prompt", "--outdir", "--skip_grid", "--skip_save", "--ddim_steps", "--plms", "--dpm_solver",
             "--laion400m", "--fixed_code", "--ddim_eta", "--n_iter", "--H", "--W", "--C", "--f", "--n_samples",
             "--n_rows", "--scale", "--from-file", "--config", "--ckpt", "--seed", "--precision", "--repeat",
             "--device", "--bf16", "--sampler", "--negative_prompt", "--vae", "--ema", "--v_prediction",
             "--no_metadata", "--watermark", "--safety_checker", "--metadata_from"]
    for flag in flags:
        assert f"  {flag} " in text or f"  {flag}\n" in text or f"  {flag}," in text, flag
    joined = " ".join(text.split())
    for default in ("(default: 50)", "(default: 2)", "(default: 512)", "(default: 7.5)", "(default: 42)",
                    "(default: autocast)", "(default: models/ldm/stable-diffusion-v1/model.ckpt)",
                    "(default: outputs/txt2img-samples)", "(default: 0.0)", "(default: 3)"):
        assert default in joined, default
    assert "image i of a run, counting across --n_iter and prompts in the order they are made, gets seed + i" in joined
