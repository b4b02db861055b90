"""txt2img end to end on the tiny checkpoint: files, grid layout, seeds, samplers, prompt files, metadata round trips.

Runs `main([...])` in-process (the model is tiny; one real subprocess run is in test_cli_process.py).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ldm.loading
import ldm.pipeline.pipeline as pipeline_module
from image_files import parameters, pixels, sidecar
from ldm.cli.txt2img import main

SIZE = 32  # the tiny model's UNet halves once and its autoencoder downsamples 8x: sizes are multiples of 16
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def cli(tiny_checkpoint, tiny_config, tmp_path, capsys):
    """cli(*flags) -> (exit status, stdout, stderr), on the tiny model with tiny sizes and 2 steps."""
    def run(*flags, outdir=None):
        base = ["--ckpt", str(tiny_checkpoint), "--config", str(tiny_config), "--H", str(SIZE), "--W", str(SIZE),
                "--ddim_steps", "2", "--n_samples", "1", "--n_iter", "1", "--outdir", str(outdir or tmp_path / "out")]
        status = main(base + [str(flag) for flag in flags])
        captured = capsys.readouterr()
        return status, captured.out, captured.err
    return run


def sample_names(outdir) -> list[str]:
    return sorted(path.name for path in (Path(outdir) / "samples").glob("*.png"))


def test_files_grid_and_seeds_of_a_default_style_run(cli, tmp_path):
    out = tmp_path / "out"
    status, stdout, stderr = cli("--n_samples", 2, "--n_iter", 2, "--seed", 100, "--prompt", "a red cube")
    assert status == 0, stderr
    assert sample_names(out) == ["00000.png", "00001.png", "00002.png", "00003.png"]
    assert sorted(p.name for p in out.iterdir()) == ["grid-0000.png", "grid-0000.yaml", "manifest.jsonl", "samples"]
    for index in range(4):
        path = out / "samples" / f"{index:05d}.png"
        assert pixels(path).shape == (SIZE, SIZE, 3)
        meta = sidecar(path)
        assert meta["seed"] == 100 + index and meta["prompt"] == "a red cube" and meta["sampler"] == "ddim"
        assert parameters(path).startswith(f"a red cube\nSteps: 2, Sampler: DDIM, CFG scale: 7.5, Seed: {100 + index}, "
                                           f"Size: {SIZE}x{SIZE}, Model hash: ")
    assert len({pixels(out / "samples" / f"{i:05d}.png").tobytes() for i in range(4)}) == 4
    # CompVis grid: n_samples images a row (one batch a row), 2-pixel black padding
    grid = pixels(out / "grid-0000.png")
    assert grid.shape == (2 * (SIZE + 2) + 2, 2 * (SIZE + 2) + 2, 3)
    cell = SIZE + 2
    assert np.array_equal(grid[2 + cell: 2 + cell + SIZE, 2 + cell: 2 + cell + SIZE], pixels(out / "samples/00003.png"))
    assert grid[:2].max() == 0 and grid[:, :2].max() == 0
    assert parameters(out / "grid-0000.png") == parameters(out / "samples/00000.png")
    assert [entry["seed"] for entry in sidecar(out / "grid-0000.png")["images"]] == [100, 101, 102, 103]
    # the summary and the CompVis closing words
    for line in ("device: cpu (float32)", "model load:", "sampling: 4 images in", "it/s", "peak memory:", "total:"):
        assert line in stdout
    assert "Your samples are ready and waiting for you here" in stdout
    assert "note:" not in stderr  # the default precision (autocast) is simply fp32 on the CPU: nothing to say


def test_second_run_continues_numbering_and_keeps_earlier_files(cli, tmp_path):
    out = tmp_path / "out"
    (out / "samples").mkdir(parents=True)
    (out / "samples" / "00041.png").write_bytes(b"someone else's image")
    (out / "grid-0007.png").write_bytes(b"an older grid")
    (out / "notes.txt").write_text("not a grid")
    assert cli("--n_samples", 2)[0] == 0
    assert cli()[0] == 0
    assert sample_names(out) == ["00041.png", "00042.png", "00043.png", "00044.png"]
    assert (out / "samples" / "00041.png").read_bytes() == b"someone else's image"
    assert (out / "grid-0007.png").read_bytes() == b"an older grid"
    assert sorted(p.name for p in out.glob("grid-*.png")) == ["grid-0007.png", "grid-0008.png", "grid-0009.png"]


def test_a_name_taken_meanwhile_is_skipped_not_overwritten(cli, tmp_path, monkeypatch):
    import ldm.cli.job as job

    out = tmp_path / "out"
    (out / "samples").mkdir(parents=True)
    (out / "samples" / "00000.png").write_bytes(b"written by a concurrent run")
    monkeypatch.setattr(job, "next_sample_number", lambda directory: 0)  # as if listed before it appeared
    assert cli("--skip_grid")[0] == 0
    assert (out / "samples" / "00000.png").read_bytes() == b"written by a concurrent run"
    assert sample_names(out) == ["00000.png", "00001.png"] and sidecar(out / "samples/00001.png")["seed"] == 42


def test_n_rows_skip_flags_and_no_metadata(cli, tmp_path):
    out = tmp_path / "rows"
    assert cli("--n_samples", 2, "--n_iter", 2, "--n_rows", 3, outdir=out)[0] == 0
    assert pixels(out / "grid-0000.png").shape == (2 * (SIZE + 2) + 2, 3 * (SIZE + 2) + 2, 3)
    out = tmp_path / "skip_save"
    assert cli("--n_samples", 2, "--skip_save", outdir=out)[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["grid-0000.png", "grid-0000.yaml", "manifest.jsonl"]
    out = tmp_path / "skip_grid"
    assert cli("--n_samples", 2, "--skip_grid", outdir=out)[0] == 0
    assert sorted(p.name for p in out.iterdir()) == ["manifest.jsonl", "samples"] and len(sample_names(out)) == 2
    out = tmp_path / "plain"
    assert cli("--no_metadata", outdir=out)[0] == 0
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["00000.png"]
    with Image.open(out / "samples/00000.png") as image:
        assert "parameters" not in image.info
    with Image.open(out / "grid-0000.png") as image:
        assert "parameters" not in image.info


def test_image_i_has_seed_plus_i_whatever_the_batch(cli, tmp_path):
    assert cli("--n_samples", 3, "--seed", 7, "--skip_grid", outdir=tmp_path / "batch")[0] == 0
    assert cli("--seed", 9, "--skip_grid", outdir=tmp_path / "alone")[0] == 0
    batch, alone = pixels(tmp_path / "batch/samples/00002.png"), pixels(tmp_path / "alone/samples/00000.png")
    difference = np.abs(batch.astype(int) - alone.astype(int))  # float rounding differs between batch sizes
    assert difference.max() <= 1 and (difference > 0).mean() < 0.01
    assert cli("--n_samples", 2, "--n_iter", 2, "--fixed_code", "--skip_grid", outdir=tmp_path / "fixed")[0] == 0
    fixed = [tmp_path / f"fixed/samples/{i:05d}.png" for i in range(4)]
    assert [sidecar(path)["seed"] for path in fixed] == [42, 43, 42, 43]
    assert np.array_equal(pixels(fixed[0]), pixels(fixed[2])) and not np.array_equal(pixels(fixed[0]), pixels(fixed[1]))


@pytest.mark.parametrize("flags, shown", [(["--plms"], "PLMS"), (["--dpm_solver"], "DPM-Solver"),
                                          (["--sampler", "DPM++ 2M Karras"], "DPM++ 2M Karras"),
                                          (["--sampler", "euler_a"], "Euler a")])
def test_sampler_flags(cli, tmp_path, flags, shown):
    assert cli(*flags, "--skip_grid")[0] == 0
    path = tmp_path / "out/samples/00000.png"
    assert f"Sampler: {shown}," in parameters(path)
    reference = tmp_path / "ddim"
    assert cli("--skip_grid", outdir=reference)[0] == 0
    assert not np.array_equal(pixels(path), pixels(reference / "samples/00000.png"))


@pytest.mark.parametrize("flags", [["--sampler", "euler_a", "--negative_prompt", "fog", "--scale", 3],
                                   ["--ddim_eta", 0.5, "--scale", 1]])
def test_metadata_round_trips_to_identical_pixels(cli, tmp_path, flags):
    assert cli("--n_iter", 2, "--seed", 5, "--prompt", "a small, green: house", *flags)[0] == 0
    original = tmp_path / "out/samples/00001.png"
    assert sidecar(original)["seed"] == 6
    for source_flag, source in (("--metadata_from", original.with_suffix(".yaml")), ("--metadata_from", original),
                                ("--from-file", original.with_suffix(".yaml"))):
        again = tmp_path / f"again{source_flag}{source.suffix}"
        # a prompt file's line wins over the flags; --metadata_from's record gives way to a flag the user gives
        seed = ["--seed", 999] if source_flag == "--from-file" else []
        status, _, stderr = cli(source_flag, source, *seed, "--skip_grid", "--n_iter", 1, outdir=again)
        assert status == 0, stderr
        assert sample_names(again) == ["00000.png"]
        assert np.array_equal(pixels(again / "samples/00000.png"), pixels(original)), (source_flag, source)
        assert sidecar(again / "samples/00000.png") == sidecar(original)
    status, _, stderr = cli("--metadata_from", original, "--seed", 999, "--skip_grid", outdir=tmp_path / "flag")
    assert status == 0, stderr
    assert sidecar(tmp_path / "flag/samples/00000.png")["seed"] == 999


def test_prompt_file_with_comments_overrides_and_a_short_last_batch(cli, tmp_path, monkeypatch):
    loads = []
    real_load = pipeline_module.load_model
    monkeypatch.setattr(pipeline_module, "load_model", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# my prompts\n\nfirst ünïcødé\n"
                       + json.dumps({"prompt": "tall", "H": 48, "seed": 1000, "steps": 4, "sampler": "Euler a"}) + "\n"
                       "  third  \n" + json.dumps({"prompt": "fourth", "negative_prompt": "dull", "scale": 1}) + "\n"
                       "fifth\n", encoding="utf-8")
    status, _, stderr = cli("--from-file", prompts, "--n_samples", 2, "--n_iter", 2, "--seed", 10)
    assert status == 0, stderr
    assert len(loads) == 1
    samples = sorted((tmp_path / "out/samples").glob("*.png"))
    meta = [sidecar(path) for path in samples]
    assert [m["prompt"] for m in meta] == ["first ünïcødé", "tall", "third", "fourth", "fifth"] * 2
    assert [m["seed"] for m in meta] == [10, 1000, 12, 13, 14, 15, 1001, 17, 18, 19]
    assert [pixels(path).shape[:2] for path in samples[:2]] == [(SIZE, SIZE), (48, SIZE)]
    assert meta[1]["steps"] == 4 and meta[1]["sampler"] == "euler_a" and meta[0]["steps"] == 2
    assert meta[3]["negative_prompt"] == "dull" and meta[3]["scale"] == 1.0
    assert "Negative prompt: dull\n" in parameters(samples[3])
    grid = pixels(tmp_path / "out/grid-0000.png")  # 10 images, 2 a row, cells as large as the largest image
    assert grid.shape == (5 * (48 + 2) + 2, 2 * (SIZE + 2) + 2, 3)


def test_repeat_renders_each_prompt_this_often(cli, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("one\ntwo\n")
    assert cli("--from-file", prompts, "--repeat", 2, "--n_samples", 3, "--skip_grid")[0] == 0
    assert [sidecar(p)["prompt"] for p in sorted((tmp_path / "out/samples").glob("*.png"))] == ["one", "one", "two",
                                                                                                 "two"]


def test_vae_file_replaces_the_autoencoder_and_is_recorded(cli, tmp_path, tiny_checkpoint):
    state = torch.load(tiny_checkpoint, weights_only=True)["state_dict"]
    vae = {k[len("first_stage_model."):]: v.clone() for k, v in state.items() if k.startswith("first_stage_model.")}
    vae["decoder.conv_out.bias"] += 0.5
    torch.save({"state_dict": vae}, tmp_path / "brighter.vae.pt")
    assert cli("--skip_grid", outdir=tmp_path / "plain")[0] == 0
    assert cli("--skip_grid", "--vae", tmp_path / "brighter.vae.pt", outdir=tmp_path / "vae")[0] == 0
    plain, brighter = pixels(tmp_path / "plain/samples/00000.png"), pixels(tmp_path / "vae/samples/00000.png")
    assert brighter.mean() > plain.mean() + 20
    assert ", VAE: brighter.vae.pt," in parameters(tmp_path / "vae/samples/00000.png")


def test_loader_flags_are_passed_through(cli, tmp_path, monkeypatch):
    seen = {}

    def fake_load(ckpt, config=None, **kwargs):
        seen.update(kwargs, ckpt=ckpt, config=config)
        raise ldm.loading.LoadError("stopped by the test")

    monkeypatch.setattr(pipeline_module, "load_model", fake_load)
    monkeypatch.setattr(pipeline_module, "check_loadable", lambda *args, **kwargs: None)  # the tiny model has no EMA
    status, _, stderr = cli("--ema", "--v_prediction", "--device", "cpu", "--precision", "full")
    assert status == 2 and stderr.strip().endswith("error: stopped by the test")
    assert seen["use_ema"] is True and seen["v_prediction"] is True and seen["vae"] is None
    assert seen["device"] == torch.device("cpu") and seen["dtype"] == torch.float32
    assert not (tmp_path / "out").exists()


def test_ema_on_a_checkpoint_without_ema_weights(cli, tmp_path):
    status, _, stderr = cli("--ema")
    assert status == 2 and "EMA weights were asked for but this checkpoint has none" in stderr
    assert not (tmp_path / "out").exists()


def test_watermark_keeps_the_metadata(cli, tmp_path, monkeypatch):
    import sys
    import types

    calls = []

    class FakeEncoder:  # stands in for invisible-watermark's WatermarkEncoder, which needs OpenCV
        def set_watermark(self, kind, payload):
            calls.append((kind, payload))

        def encode(self, bgr, method):
            calls.append(method)
            marked = bgr.copy()
            marked[0, 0] = (255, 0, 0)  # blue in BGR
            return marked

    monkeypatch.setitem(sys.modules, "imwatermark", types.SimpleNamespace(WatermarkEncoder=FakeEncoder))
    assert cli("--watermark", "--skip_grid")[0] == 0
    path = tmp_path / "out/samples/00000.png"
    assert calls == [("bytes", b"StableDiffusionV1"), "dwtDct"]
    assert tuple(pixels(path)[0, 0]) == (0, 0, 255)  # back in RGB
    assert parameters(path).startswith("a painting of a virus monster playing guitar\nSteps: 2")


def test_bf16_runs_in_bfloat16(cli, tmp_path):
    status, stdout, _ = cli("--bf16", "--skip_grid")
    assert status == 0 and "device: cpu (bfloat16)" in stdout
    assert pixels(tmp_path / "out/samples/00000.png").std() > 5  # a real image, not a flat or black one


def test_memory_flags_keep_the_pixels(cli, tmp_path):
    """Attention slicing, VAE slicing and tiling change how the work is done, not the image; --offload on the CPU
    is a note."""
    status, _, _ = cli("--n_samples", "2", outdir=tmp_path / "plain")
    assert status == 0
    status, _, err = cli("--n_samples", "2", "--attention_slicing", "--vae_slicing", "--vae_tiling", "--offload",
                         "model", outdir=tmp_path / "lean")
    assert status == 0 and "--offload has no effect on the CPU" in err
    for name in ("00000.png", "00001.png"):
        plain, lean = pixels(tmp_path / "plain" / "samples" / name), pixels(tmp_path / "lean" / "samples" / name)
        assert np.abs(plain.astype(int) - lean.astype(int)).max() <= 1
