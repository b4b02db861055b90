"""Requests that cannot fit are refused before any weight is read, in one line naming the flag that makes them fit;
the estimate is a lower bound, so what fits is never refused."""
from __future__ import annotations

import resource
import time

import pytest
import torch

import ldm.pipeline.memory as memory
import ldm.pipeline.pipeline as pipeline_module
from ldm.pipeline import Options, Request
from ldm.pipeline.model_info import model_geometry

GIB = 2**30


def error_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.strip() and not line.startswith("\r")]


@pytest.fixture
def no_loading(monkeypatch):
    monkeypatch.setattr(pipeline_module, "load_model", lambda *args, **kwargs: pytest.fail("the weights were read"))


@pytest.mark.skipif(memory.available_memory(torch.device("cpu")) is None, reason="needs Linux's MemAvailable")
def test_a_huge_image_on_the_cpu_is_refused_before_loading(txt2img, tmp_path, no_loading):
    rss_before, start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, time.perf_counter()
    status, out, err = txt2img("--H", 16384, "--W", 16384, outdir=tmp_path / "out")
    assert status == 2 and len(error_lines(err)) == 1, err
    assert "16384x16384 images in a batch of 1 need at least" in err and "use --vae_tiling" in err
    assert "Loading model" not in out and not (tmp_path / "out").exists()
    assert time.perf_counter() - start < 10  # nothing was allocated to find out
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 512 * 1024  # KiB: under 512 MiB more


def test_a_batch_that_cannot_fit_names_the_batch_size_that_does(txt2img, tmp_path, monkeypatch, no_loading):
    monkeypatch.setattr(memory, "available_memory", lambda device: (64 * 2**20, "the machine has 64 MiB available"))
    status, out, err = txt2img("--n_samples", 2000, "--vae_slicing", "--H", 64, "--W", 64, outdir=tmp_path / "out")
    assert status == 2 and len(error_lines(err)) == 1, err
    line = error_lines(err)[0]
    assert "64x64 images in a batch of 2000 need at least" in line and "but the machine has 64 MiB available" in line
    fits = int(line.rsplit("--n_samples ", 1)[1])
    assert 1 <= fits < 2000 and not (tmp_path / "out").exists()


def test_decoding_a_batch_names_vae_slicing_and_a_tiled_decode_names_a_smaller_size(tiny_checkpoint, tiny_config):
    from ldm.loading import load_config

    config = load_config(tiny_config)
    free, weights = 512 * 2**20, 0
    request = Request("a", batch_size=64, height=1024, width=1024, steps=1)
    needed = memory.request_memory(config, request, Options(), 4)
    assert needed.decoding > free >= needed.decoding_per_image
    assert "use --vae_slicing" in memory._memory_refusal(request, needed, Options(), weights, free, "x")
    huge = Request("a", height=16384, width=16384, steps=1)
    tiled = Options(vae_tiling=True)
    needed = memory.request_memory(config, huge, tiled, 4)
    assert needed.decoding == 3 * 32 * (64 * 8) ** 2 * 4  # one 512x512 tile of the 32-channel decoder, fp32


def output_bytes(module: torch.nn.Module, run) -> list[int]:
    """The bytes of every tensor each submodule of `module` returns while `run()` runs."""
    sizes: list[int] = []
    hooks = [child.register_forward_hook(lambda _, __, output: sizes.append(output.nbytes)
                                         if isinstance(output, torch.Tensor) else None)
             for child in module.modules()]
    try:
        with torch.no_grad():
            run()
    finally:
        for hook in hooks:
            hook.remove()
    return sizes


def test_the_estimate_lies_between_the_largest_tensor_and_all_tensors_a_run_makes(tiny_checkpoint, tiny_config):
    """Measured on the tiny model: the estimate is at least the largest activation and at most the sum of all of
    them (what would be live if nothing were freed), for the UNet's guided batch and for the decoder."""
    from ldm.loading import load_config, load_model

    model = load_model(tiny_checkpoint, tiny_config)
    request = Request("a", batch_size=2, height=64, width=64, steps=1)
    needed = memory.request_memory(load_config(tiny_config), request, Options(), 4)
    guided = 2 * request.batch_size
    x, t = torch.randn(guided, 4, 8, 8), torch.full((guided,), 500)
    context = model.get_learned_conditioning([""] * guided)
    unet = output_bytes(model.model.diffusion_model, lambda: model.apply_model(x, t, context))
    assert max(unet) <= needed.sampling <= sum(unet)
    decoder = output_bytes(model.first_stage_model.decoder, lambda: model.decode_first_stage(x[:2]))
    assert max(decoder) <= needed.decoding <= sum(decoder)
