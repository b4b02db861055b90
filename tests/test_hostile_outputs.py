"""Careless and hostile input around the run itself: endless prompt files, outputs whose names another process (or a
symbolic link) takes meanwhile, allocation failures of every back-end. Each refusal is one stderr line and exit 2,
before anything is loaded or written."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from image_files import sidecar
from ldm.cli import job
from ldm.cli.outputs import write_new_files
from ldm.cli.prompts import MAX_PROMPTS
from ldm.pipeline.decoding import is_out_of_memory


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if not line.startswith("\r") and line.strip()]


@pytest.mark.skipif(not Path("/dev/zero").exists(), reason="needs /dev/zero")
def test_an_endless_prompt_file_is_read_only_up_to_its_cap(txt2img, tmp_path):
    status, out, err = txt2img("--from-file", "/dev/zero", outdir=tmp_path / "out")
    assert status == 2 and error_lines(err) == [
        "txt2img.py: error: prompt file /dev/zero is larger than 16 MiB: split it into several files (or check that "
        "it is a prompt file)"]
    assert "Loading model" not in out and not (tmp_path / "out").exists()


def test_a_prompt_file_with_too_many_prompts_is_refused(txt2img, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a\n" * (MAX_PROMPTS + 1))
    status, out, err = txt2img("--from-file", prompts, outdir=tmp_path / "out")
    assert status == 2 and error_lines(err) == [
        f"txt2img.py: error: prompt file {prompts} has {MAX_PROMPTS + 1} prompts, more than {MAX_PROMPTS}: split it "
        f"into several files"]
    assert "Loading model" not in out and not (tmp_path / "out").exists()


def test_a_sidecar_name_taken_after_the_scan_moves_image_and_sidecar_to_the_next_number(tmp_path):
    (tmp_path / "00000.yaml").write_text("someone else's sidecar")
    os.symlink(tmp_path / "elsewhere.txt", tmp_path / "00001.yaml")  # a link in the way is never followed
    paths, number = write_new_files(tmp_path, "{:05d}", 0, {".png": b"png", ".yaml": b"yaml"})
    assert number == 2 and [path.name for path in paths] == ["00002.png", "00002.yaml"]
    assert (tmp_path / "00000.yaml").read_text() == "someone else's sidecar"
    assert (tmp_path / "00001.yaml").is_symlink() and not (tmp_path / "elsewhere.txt").exists()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["00000.yaml", "00001.yaml", "00002.png",
                                                                "00002.yaml"]  # nothing left half-made


def test_the_cli_never_overwrites_a_sidecar_made_meanwhile(txt2img, tmp_path, monkeypatch):
    out = tmp_path / "out"
    (out / "samples").mkdir(parents=True)
    (out / "samples" / "00000.yaml").write_text("made by another run after this one listed the folder")
    monkeypatch.setattr(job, "next_sample_number", lambda directory: 0)
    status, _, err = txt2img("--skip_grid", outdir=out)
    assert status == 0, err
    assert (out / "samples" / "00000.yaml").read_text() == "made by another run after this one listed the folder"
    assert not (out / "samples" / "00000.png").exists() and sidecar(out / "samples" / "00001.png")["seed"] == 42


@pytest.mark.parametrize("error, expected", [
    (torch.OutOfMemoryError("CUDA out of memory"), True),
    (RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried "
                  "to allocate 1099511627776 bytes. Error code 12 (Cannot allocate memory)"), True),
    (RuntimeError("MPS backend out of memory (MPS allocated: 9 GB)"), True),
    (MemoryError(), True),
    (RuntimeError("shapes cannot be multiplied"), False),
])
def test_allocation_failures_of_every_back_end_are_recognised(error, expected):
    assert is_out_of_memory(error) is expected


def test_a_huge_init_image_needs_an_asked_size(tmp_path, capsys, tiny_checkpoint, tiny_config):
    from PIL import Image

    from ldm.cli.img2img import main as img2img_main

    Image.new("RGB", (10000, 10000), (40, 80, 120)).save(tmp_path / "huge.png")
    flags = ["--ckpt", str(tiny_checkpoint), "--config", str(tiny_config), "--init-img", str(tmp_path / "huge.png"),
             "--outdir", str(tmp_path / "out"), "--ddim_steps", "2", "--n_samples", "1"]
    status = img2img_main(flags)
    out, err = capsys.readouterr()
    assert status == 2 and error_lines(err) == [
        "img2img.py: error: --init-img is 10000x10000, larger than 2048 pixels a side: pass --W and --H to resize it "
        "(e.g. --W 512 --H 512)"]
    assert "Loading model" not in out and not (tmp_path / "out").exists()
    assert img2img_main(flags + ["--W", "64", "--H", "64", "--skip_grid"]) == 0  # resized to the asked size
    assert (tmp_path / "out" / "samples" / "00000.png").exists()


def test_a_config_naming_foreign_code_is_refused_unless_trusted(txt2img, tmp_path, tiny_config):
    """The yaml beside a downloaded checkpoint names `collections.OrderedDict` as its text encoder's target: refused in
    one line before anything is built; --trust_config lets it be built (and the model then fails to load, as that
    class is no text encoder)."""
    config = tmp_path / "foreign.yaml"
    config.write_text(tiny_config.read_text().replace("ldm.modules.encoders.modules.FrozenCLIPEmbedder",
                                                      "collections.OrderedDict"))
    status, out, err = txt2img("--config", config, outdir=tmp_path / "out")
    assert status == 2 and len(error_lines(err)) == 1 and "collections.OrderedDict" in err
    assert "--trust_config" in err and "Loading model" not in out and not (tmp_path / "out").exists()
    status, _, err = txt2img("--config", config, "--trust_config", outdir=tmp_path / "out")
    assert "is outside this project" not in err and "Traceback" not in err


def test_a_pasted_book_as_a_weighted_prompt_is_refused_before_loading(txt2img, tmp_path):
    book = "the quick brown fox jumps over the lazy dog " * 600  # 5,400 tokens
    status, out, err = txt2img("--prompt", book, "--prompt_weighting", outdir=tmp_path / "out")
    assert status == 2 and len(error_lines(err)) == 1
    assert "has 5400 tokens, more than the 64 chunks of 75 that weighted prompts are read in" in err
    assert "Loading model" not in out and not (tmp_path / "out").exists()
