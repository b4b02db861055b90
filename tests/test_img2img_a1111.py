"""AUTOMATIC1111's img2img step count for k-diffusion samplers (`--img2img_steps a1111`): its arithmetic written out
(sd_samplers_common.setup_img2img_steps and sd_samplers_kdiffusion.sample_img2img), the library run against that
arithmetic on the tiny model, and the CLI: an AUTOMATIC1111 infotext turns it on, our own records keep it."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from checkpoint_factory import TEST_CONFIGS
from image_files import pixels
from PIL import Image
from smooth_inputs import smooth_image

from ldm.cli.img2img import main
from ldm.loading import load_model
from ldm.models.diffusion.noise import ImageNoise
from ldm.models.diffusion.samplers import img2img_steps, resolve_sampler, sample, sample_img2img

pytestmark = pytest.mark.usefixtures("one_thread")


def a1111_schedule(sigmas: torch.Tensor, steps: int, strength: float) -> torch.Tensor:
    """AUTOMATIC1111's img2img sigmas, as its code computes them (default options: no "fixed steps")."""
    t_enc = int(min(strength, 0.999) * steps)  # setup_img2img_steps
    return sigmas[steps - t_enc - 1:]  # sample_img2img: sigma_sched


@pytest.mark.parametrize("steps, strength", [(20, 0.75), (20, 1.0), (20, 0.0), (4, 0.6), (30, 0.33), (7, 0.999)])
def test_a1111_rule_runs_the_steps_automatic1111_runs(steps, strength):
    sigmas = torch.arange(steps + 1, 0, -1, dtype=torch.float32)  # stand-in: only the count matters here
    assert img2img_steps(steps, strength, "a1111") == len(a1111_schedule(sigmas, steps, strength)) - 1
    assert img2img_steps(steps, strength) == int(strength * steps)  # CompVis' and diffusers' count


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_model(tiny_checkpoint, TEST_CONFIGS / "tiny-v1.yaml")


@pytest.mark.parametrize("sampler, strength", [("euler", 0.75), ("euler_a", 0.5), ("dpmpp_2m", 0.3)])
@torch.no_grad()
def test_k_samplers_start_one_sigma_higher_as_automatic1111(model, sampler, strength):
    """The library run equals the sampler on AUTOMATIC1111's sigma_sched from x + noise * sigma_sched[0]; the
    diffusers rule starts one sigma lower and runs one step less."""
    steps = 8
    generator = torch.Generator().manual_seed(3)
    x_init = torch.randn(1, 4, 8, 8, generator=generator)
    start = torch.randn(1, 4, 8, 8, generator=generator)
    cond, uncond = model.get_learned_conditioning(["a red circle"]), model.get_learned_conditioning([""])
    ours = sample_img2img(model, sampler, steps, x_init, strength, cond, uncond, 5.0, ImageNoise([4]),
                          start_noise=start, disable=True, steps_rule="a1111")
    spec = resolve_sampler(sampler)  # its own schedule, as the img2img run takes it
    sigmas = spec.sigmas(spec.denoiser(model, quantize=False), steps, False)
    sched = a1111_schedule(sigmas, steps, strength)
    reference = sample(model, sampler, len(sched) - 1, tuple(x_init.shape), cond, uncond, 5.0, ImageNoise([4]),
                       x_T=(x_init + start * sched[0]) / sched[0], sigmas=sched, disable=True)
    # (x + noise * sigma) / sigma * sigma is x + noise * sigma to float rounding, which the random tiny UNet amplifies
    torch.testing.assert_close(ours, reference, atol=5e-4, rtol=0)
    default = sample_img2img(model, sampler, steps, x_init, strength, cond, uncond, 5.0, ImageNoise([4]),
                             start_noise=start, disable=True)
    assert (default - ours).abs().max() > 5e-2


@torch.no_grad()
def test_ddim_keeps_compvis_img2img_under_either_rule(model):
    x_init = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    cond, uncond = model.get_learned_conditioning(["a red circle"]), model.get_learned_conditioning([""])
    runs = [sample_img2img(model, "ddim", 8, x_init, 0.5, cond, uncond, 5.0, ImageNoise([4]), disable=True,
                           steps_rule=rule) for rule in ("diffusers", "a1111")]
    assert torch.equal(*runs)


@pytest.fixture
def cli(tiny_checkpoint, tiny_config, capsys):
    def run(*flags):
        status = main(["--ckpt", str(tiny_checkpoint), "--config", str(tiny_config), "--precision", "full",
                       "--n_samples", "1", *map(str, flags)])
        captured = capsys.readouterr()
        return status, captured.err
    return run


def test_an_automatic1111_infotext_counts_img2img_steps_as_it_does(cli, tmp_path):
    init = tmp_path / "sketch.png"
    smooth_image(64, 64).save(init)
    infotext = tmp_path / "a1111.txt"
    infotext.write_text("a red circle on a blue background\nNegative prompt: blurry\nSteps: 8, Sampler: Euler a, "
                        "CFG scale: 5, Seed: 5, Size: 64x64, Denoising strength: 0.6, Version: v1.10.1\n")
    status, err = cli("--metadata_from", infotext, "--init-img", init, "--outdir", tmp_path / "pasted")
    assert status == 0, err
    pasted = tmp_path / "pasted" / "samples" / "00000"
    flags = ["--init-img", init, "--prompt", "a red circle on a blue background", "--negative_prompt", "blurry",
             "--ddim_steps", 8, "--sampler", "euler_a", "--scale", 5, "--seed", 5, "--strength", 0.6, "--rng", "nv",
             "--prompt_weighting"]
    assert cli(*flags, "--img2img_steps", "a1111", "--outdir", tmp_path / "explicit")[0] == 0
    assert cli(*flags, "--outdir", tmp_path / "diffusers-rule")[0] == 0
    explicit = pixels(tmp_path / "explicit" / "samples" / "00000.png")
    assert np.array_equal(pixels(pasted.with_suffix(".png")), explicit)
    assert not np.array_equal(pixels(tmp_path / "diffusers-rule" / "samples" / "00000.png"), explicit)
    assert "Img2img steps: A1111" in Image.open(pasted.with_suffix(".png")).text["parameters"]
    assert yaml.safe_load(pasted.with_suffix(".yaml").read_text())["img2img_steps"] == "a1111"
    # our own record makes it again, and a flag given wins
    status, err = cli("--metadata_from", pasted.with_suffix(".yaml"), "--outdir", tmp_path / "again")
    assert status == 0, err
    assert np.array_equal(pixels(tmp_path / "again" / "samples" / "00000.png"), explicit)
    status, err = cli("--metadata_from", pasted.with_suffix(".yaml"), "--img2img_steps", "diffusers", "--outdir",
                      tmp_path / "overridden")
    assert status == 0, err
    assert np.array_equal(pixels(tmp_path / "overridden" / "samples" / "00000.png"),
                          pixels(tmp_path / "diffusers-rule" / "samples" / "00000.png"))
