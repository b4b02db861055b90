"""Shared fixtures: tiny random checkpoints in the released key layout, written once per test session."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from checkpoint_factory import TEST_CONFIGS, make_tiny_checkpoint, make_tiny_xl_checkpoint  # noqa: E402

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict:
    """{("v1" | "v2", ".ckpt" | ".safetensors"): path}, each with the same random weights per family."""
    folder = tmp_path_factory.mktemp("checkpoints")
    paths = {}
    for family in ("v1", "v2"):
        for suffix in (".ckpt", ".safetensors"):
            paths[family, suffix] = make_tiny_checkpoint(folder / f"tiny-{family}{suffix}", family)
    return paths


@pytest.fixture(scope="session")
def tiny_xl_checkpoints(tmp_path_factory) -> dict:
    """{"xl" | "xl-refiner": path}: tiny SDXL base and refiner .safetensors (tests/configs/tiny-xl*.yaml)."""
    folder = tmp_path_factory.mktemp("sdxl")
    return {family: make_tiny_xl_checkpoint(folder / f"tiny-{family}.safetensors", family, seed=3)
            for family in ("xl", "xl-refiner")}


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_checkpoints) -> Path:
    """A tiny SD 1.x `.ckpt`; its config is tests/configs/tiny-v1.yaml (64x64 images, f=8, 4 latent channels)."""
    return tiny_checkpoints["v1", ".ckpt"]


@pytest.fixture(scope="session")
def tiny_config() -> Path:
    return TEST_CONFIGS / "tiny-v1.yaml"


@pytest.fixture
def txt2img(tiny_checkpoint, tiny_config, tmp_path, capsys, monkeypatch):
    """txt2img(*flags, outdir=None) -> (exit status, stdout, stderr): the CLI in-process on the tiny SD 1.x model,
    32x32, 2 DDIM steps, one batch of one image, one thread (two gain nothing on the tiny model)."""
    from ldm.cli.txt2img import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # model hashes are cached there

    def run(*flags, outdir=None):
        base = ["--ckpt", str(tiny_checkpoint), "--config", str(tiny_config), "--H", "32", "--W", "32",
                "--ddim_steps", "2", "--n_samples", "1", "--n_iter", "1", "--outdir", str(outdir or tmp_path / "out")]
        status = main(base + [str(flag) for flag in flags])
        captured = capsys.readouterr()
        return status, captured.out, captured.err
    yield run
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def hf_vocabulary(tmp_path_factory) -> Path:
    """A folder with vocab.json / merges.txt in the Hugging Face CLIP tokenizer layout, from our vocabulary."""
    from reference_text import write_hf_vocabulary

    folder = tmp_path_factory.mktemp("vocabulary")
    write_hf_vocabulary(folder)
    return folder


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module of tiny-tensor tests: on a shared machine two intra-op threads wait on each other
    (measured here: 79 s instead of 6 s for the shapes prompt grid). Modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def one_thread(monkeypatch, tmp_path):
    """One thread: the tiny model gains nothing from two, and two threads on a shared machine are far slower. Model
    hashes are cached under the test's tmp_path. Modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # model hashes are cached there
    yield
    torch.set_num_threads(threads)
