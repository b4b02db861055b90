"""AUTOMATIC1111's schedule types through a request: its sigmas for the sampler (Automatic defaults and DPM2's
dropped sigma included), refused for CompVis samplers, recorded as "Schedule type", read from old combined names."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from image_files import parameters, pixels
from ldm.models.diffusion.schedule import NoiseSchedule
from ldm.models.diffusion.schedule_types import a1111_sigmas
from ldm.pipeline import Pipeline, Request, UsageError
from ldm.pipeline.metadata import encode_png

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def pipeline(tiny_checkpoint, tiny_config):
    return Pipeline.from_checkpoint(str(tiny_checkpoint), str(tiny_config), precision="full", hash_files=False)


def test_a_schedule_type_gives_automatic1111s_sigmas(pipeline):
    request = Request("a cat", sampler="euler", scheduler="karras", steps=6, height=32, width=32)
    sigmas = pipeline.sigmas(request, "euler", 6)
    expected = a1111_sigmas("Euler", 6, NoiseSchedule(pipeline.model.alphas_cumprod), "Karras")
    assert torch.equal(sigmas.cpu(), expected) and len(sigmas) == 7 and sigmas[-1] == 0
    assert sigmas[0] > sigmas[1] > sigmas[-2]
    plain = pipeline(request.replace(scheduler=None)).pixels
    assert not np.array_equal(pipeline(request).pixels, plain)


def test_dpm2_drops_the_next_to_last_sigma_as_automatic1111_does(pipeline):
    request = Request("a cat", sampler="dpm2", scheduler="Automatic", steps=5, height=32, width=32)
    sigmas = pipeline.sigmas(request, "dpm2", 5)
    assert len(sigmas) == 6  # 6 levels + 0 made, the next-to-last dropped: still 5 steps


def test_lcm_reads_automatic1111s_schedule_types_off_its_50_distilled_levels(pipeline):
    """AUTOMATIC1111's LCM sampler hands its schedule types the LCM denoiser (sd_samplers_lcm.LCMCompVisDenoiser):
    the 50 levels at timesteps 19, 39, ..., 999, whose get_sigmas(n) is linspace(999, 19, n) in timesteps, each
    mapped back to the table's index ((t - 19) / 20) and interpolated in log sigma there. Diffusers' spacings stay
    on the model's 1,000 timesteps."""
    alphas = pipeline.model.alphas_cumprod.double().cpu().numpy()
    table = np.sqrt((1 - alphas) / alphas)[19::20].astype(np.float32)  # ascending, 50 levels
    steps = 4
    index = (np.linspace(999.0, 19.0, steps, dtype=np.float32) - 19) / 20
    low = np.floor(index).astype(int).clip(0, 48)
    weight = index - low
    logs = np.log(table)
    expected = np.exp((1 - weight) * logs[low] + weight * logs[low + 1])
    request = Request("a cat", sampler="lcm", scheduler="Automatic", steps=steps, height=32, width=32)
    sigmas = pipeline.sigmas(request, "lcm", steps).cpu().numpy()
    np.testing.assert_allclose(sigmas[:-1], expected, rtol=2e-6)
    assert sigmas[-1] == 0
    karras = pipeline.sigmas(request.replace(scheduler="karras"), "lcm", steps).cpu().numpy()
    np.testing.assert_allclose([karras[0], karras[-2]], [table[-1], table[0]], rtol=1e-6)  # the LCM levels' range
    full = pipeline.sigmas(request.replace(scheduler="lcm"), "lcm", steps)
    expected_full = a1111_sigmas("LCM", steps, NoiseSchedule(pipeline.model.alphas_cumprod), "LCM")
    assert torch.equal(full.cpu(), expected_full)


def test_compvis_samplers_take_no_schedule_type():
    with pytest.raises(UsageError, match="ddim steps through the model's own timesteps and takes no schedule type"):
        Request("a cat", sampler="ddim", scheduler="Karras")
    with pytest.raises(UsageError, match="unknown schedule type 'wobbly'"):
        Request("a cat", sampler="euler", scheduler="wobbly")


def test_the_schedule_type_is_written_and_an_old_combined_name_read(txt2img, tmp_path, tiny_checkpoint, tiny_config,
                                                                    capsys):
    from ldm.cli.txt2img import main

    status, _, err = txt2img("--sampler", "DPM++ 2M", "--scheduler", "Karras", "--ddim_steps", 4, "--seed", 3,
                             "--skip_grid", outdir=tmp_path / "flags")
    assert status == 0, err
    made = tmp_path / "flags" / "samples" / "00000.png"
    assert "Sampler: DPM++ 2M," in parameters(made) and "Schedule type: Karras" in parameters(made)
    infotext = ("a painting of a virus monster playing guitar\nSteps: 4, Sampler: DPM++ 2M Karras, CFG scale: 7.5, "
                "Seed: 3, Size: 32x32, Model: tiny-v1, RNG: CPU, Version: v1.6.0")
    (tmp_path / "old.png").write_bytes(encode_png(np.zeros((8, 8, 3), dtype=np.uint8), infotext))
    flags = ["--ckpt", str(tiny_checkpoint), "--config", str(tiny_config), "--metadata_from", str(tmp_path / "old.png"),
             "--skip_grid", "--outdir", str(tmp_path / "pasted")]
    assert main(flags) == 0, capsys.readouterr().err
    assert np.array_equal(pixels(tmp_path / "pasted" / "samples" / "00000.png"), pixels(made))
