"""Latent consistency models distilled with the guidance scale as a UNet input (LCM_Dreamshaper_v7's
`time_cond_proj_dim`): a tiny one saved by diffusers' LatentConsistencyModelPipeline, read from its folder, its
guidance embedding, UNet and whole run against diffusers' on the same weights and noise, and the script's preset."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from checkpoint_factory import TEST_CONFIGS, write_checkpoint
from diffusers import LatentConsistencyModelPipeline, LCMScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from omegaconf import OmegaConf
from PIL import Image
from reference_sd import PROMPT, diffusers_pipeline
from reference_sdxl import diffusers_parts

from ldm.loading import load_model
from ldm.models.diffusion.noise import ImageNoise
from ldm.modules.diffusionmodules.util import guidance_scale_embedding
from ldm.pipeline import Pipeline, Request

WIDTH = 16  # the tiny guidance embedding (LCM_Dreamshaper_v7's is 256)
SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).norm() / theirs.norm()).item()


def diffusers_latents(pipe, sigma_max: float) -> torch.Tensor:
    """diffusers' 4-step latents at guidance 8 for seeds 3 and 4, from our starting noise (in diffusers' variable:
    the k samplers start at noise * sigma_max, diffusers' LCM at unit variance) and our step noise."""
    pipe.set_progress_bar_config(disable=True)
    noise = ImageNoise([3, 4])
    x_T = noise.randn((2, 4, 8, 8)) * sigma_max / (sigma_max**2 + 1) ** 0.5
    latents = pipe(PROMPT, height=64, width=64, num_inference_steps=4, guidance_scale=8.0, num_images_per_prompt=2,
                   latents=x_T, generator=noise.generators, output_type="latent").images
    assert latents.abs().max() > 0.1
    return latents


@pytest.fixture(scope="module")
def lcm_folder(tiny_checkpoint, tmp_path_factory, hf_vocabulary) -> Path:
    """tests/configs/tiny-v1.yaml's weights with a random guidance projection, as diffusers saves an LCM."""
    root = tmp_path_factory.mktemp("lcm")
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(hf_vocabulary / name, root / name)
    base = diffusers_pipeline(tiny_checkpoint, root, LCMScheduler(**SCHEDULE))
    unet = UNet2DConditionModel(**{**base.unet.config, "time_cond_proj_dim": WIDTH})
    missing, unexpected = unet.load_state_dict(base.unet.state_dict(), strict=False)
    assert missing == ["time_embedding.cond_proj.weight"] and unexpected == []
    with torch.no_grad():
        unet.time_embedding.cond_proj.weight.copy_(
            torch.randn(unet.time_embedding.cond_proj.weight.shape, generator=torch.Generator().manual_seed(8)) * 0.3)
    pipe = LatentConsistencyModelPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                          unet=unet.eval(), scheduler=LCMScheduler(**SCHEDULE), safety_checker=None,
                                          feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(root / "LCM_tiny")
    return root / "LCM_tiny"


def test_guidance_embedding_is_diffusers(lcm_folder):
    pipe = LatentConsistencyModelPipeline.from_pretrained(str(lcm_folder), safety_checker=None)
    w = torch.tensor([0.0, 0.5, 7.0, 7.5])
    for width in (WIDTH, 256, 15):
        torch.testing.assert_close(guidance_scale_embedding(w, width),
                                   pipe.get_guidance_scale_embedding(w, embedding_dim=width), atol=1e-6, rtol=0)


@torch.no_grad()
def test_unet_with_guidance_embedding_matches_diffusers(lcm_folder, tiny_checkpoint):
    model = load_model(lcm_folder)
    unet = model.model.diffusion_model
    reference = UNet2DConditionModel.from_pretrained(str(lcm_folder / "unet")).eval()
    assert torch.equal(unet.time_cond_proj.weight, reference.time_embedding.cond_proj.weight)
    original = load_model(tiny_checkpoint, TEST_CONFIGS / "tiny-v1.yaml")  # the rest of the weights are the file's
    assert all(torch.equal(value, original.state_dict()[key]) for key, value in model.state_dict().items()
               if key in original.state_dict())
    generator = torch.Generator().manual_seed(2)
    x, context = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 77, 32, generator=generator)
    timesteps = torch.tensor([999, 259])
    embedding = guidance_scale_embedding(torch.tensor([7.0, 2.0]), WIDTH)
    ours = unet(x, timesteps, context, timestep_cond=embedding)
    theirs = reference(x, timesteps, encoder_hidden_states=context, timestep_cond=embedding).sample
    assert relative_error(ours, theirs) < 1e-5
    assert relative_error(unet(x, timesteps, context), theirs) > 1e-2  # the embedding matters


@torch.no_grad()
def test_lcm_run_matches_diffusers_latent_consistency_pipeline(lcm_folder):
    """Request(sampler="lcm", scheduler="LCM", scale=8) on the folder against diffusers' pipeline from the same
    folder: the same starting latents (ours, in diffusers' variable) and step noise; scale 8 is w = 7 embedded, one
    UNet call a step."""
    pipeline = Pipeline.from_checkpoint(str(lcm_folder), hash_files=False)
    calls = []
    unet = pipeline.model.model.diffusion_model
    hook = unet.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    result = pipeline(Request(PROMPT, seeds=[3, 4], steps=4, sampler="lcm", scheduler="LCM", scale=8.0, height=64,
                              width=64))
    hook.remove()
    assert calls == [2] * 4  # no unconditional half
    pipe = LatentConsistencyModelPipeline.from_pretrained(str(lcm_folder), safety_checker=None)
    expected = diffusers_latents(pipe, float(pipeline.schedule.sigma_max))
    assert relative_error(result.latents, expected) < 1e-4
    plain = pipeline(Request(PROMPT, seeds=[3, 4], steps=4, sampler="lcm", scheduler="LCM", scale=1.0, height=64,
                             width=64))
    assert relative_error(plain.latents, expected) > 1e-3  # w = 0 is another image


def test_script_applies_the_lcm_preset_with_its_guidance(lcm_folder, tmp_path, capsys):
    from ldm.cli.txt2img import main

    status = main(["--ckpt", str(lcm_folder), "--prompt", PROMPT, "--H", "64", "--W", "64", "--n_samples", "1",
                   "--n_iter", "1", "--outdir", str(tmp_path)])
    err = capsys.readouterr().err
    assert status == 0, err
    assert "with embedded guidance" in err and "--scale 8" in err
    text = Image.open(next((tmp_path / "samples").glob("*.png"))).text["parameters"]
    assert "Steps: 4, Sampler: LCM, CFG scale: 8," in text and "Schedule type: LCM" in text
    assert np.asarray(Image.open(next((tmp_path / "samples").glob("*.png")))).std() > 1


@pytest.fixture(scope="module")
def xl_lcm(tiny_xl_checkpoints, tmp_path_factory, hf_vocabulary) -> dict[str, Path]:
    """An SDXL latent consistency model with a guidance embedding (as latent-consistency/lcm-sdxl): a whole folder,
    and its UNet alone in diffusers' names for --unet on the tiny SDXL base."""
    root = tmp_path_factory.mktemp("lcm-sdxl")
    parts = diffusers_parts(tiny_xl_checkpoints["xl"], "xl", hf_vocabulary)
    base = parts["unet"]
    unet = UNet2DConditionModel(**{**base.config, "time_cond_proj_dim": WIDTH})
    assert unet.load_state_dict(base.state_dict(), strict=False).missing_keys == ["time_embedding.cond_proj.weight"]
    with torch.no_grad():
        unet.time_embedding.cond_proj.weight.copy_(
            torch.randn(unet.time_embedding.cond_proj.weight.shape, generator=torch.Generator().manual_seed(9)) * 0.3)
    pipe = StableDiffusionXLPipeline(**{**parts, "unet": unet.eval()}, scheduler=LCMScheduler(**SCHEDULE))
    pipe.save_pretrained(root / "lcm-sdxl-tiny")
    unet_file = write_checkpoint({key: value.contiguous() for key, value in unet.state_dict().items()},
                                 root / "lcm-sdxl_unet.safetensors")
    return {"folder": root / "lcm-sdxl-tiny", "unet": unet_file}


@torch.no_grad()
def test_sdxl_lcm_with_guidance_embedding_matches_diffusers(xl_lcm, tiny_xl_checkpoints, tmp_path):
    """lcm-sdxl's way: diffusers' SDXL pipeline embeds guidance_scale - 1 for such a UNet and skips classifier-free
    guidance; ours from the folder, and from the base checkpoint with --unet (its own config saying so), give its
    latents."""
    request = Request(PROMPT, seeds=[3, 4], steps=4, sampler="lcm", scheduler="LCM", scale=8.0, height=64, width=64)
    from_folder = Pipeline.from_checkpoint(str(xl_lcm["folder"]), hash_files=False)
    config = OmegaConf.load(str(TEST_CONFIGS / "tiny-xl.yaml"))
    config.model.params.network_config.params.time_cond_proj_dim = WIDTH
    OmegaConf.save(config, tmp_path / "tiny-xl-lcm.yaml")
    with_unet = Pipeline.from_checkpoint(str(tiny_xl_checkpoints["xl"]), str(tmp_path / "tiny-xl-lcm.yaml"),
                                         hash_files=False, unet=str(xl_lcm["unet"]))
    expected = diffusers_latents(StableDiffusionXLPipeline.from_pretrained(str(xl_lcm["folder"])),
                                 float(from_folder.schedule.sigma_max))
    for pipeline in (from_folder, with_unet):
        assert relative_error(pipeline(request).latents, expected) < 1e-4


def test_a_unet_file_with_a_guidance_embedding_decides_the_derived_config(xl_lcm, tiny_xl_checkpoints):
    """Without --config, the config read from the keys takes the --unet file's (its guidance embedding included)."""
    model = load_model(tiny_xl_checkpoints["xl"], unet=xl_lcm["unet"])
    unet = model.model.diffusion_model
    assert unet.time_cond_proj is not None and unet.time_cond_proj.in_features == WIDTH
    assert load_model(tiny_xl_checkpoints["xl"]).model.diffusion_model.time_cond_proj is None


def test_the_guidance_embedding_is_told_from_the_files_layout(xl_lcm, lcm_folder, tiny_xl_checkpoints, tmp_path):
    from ldm.pipeline.model_info import takes_guidance_embedding

    assert takes_guidance_embedding(str(lcm_folder)) and takes_guidance_embedding(str(xl_lcm["folder"]))
    assert takes_guidance_embedding(str(tiny_xl_checkpoints["xl"]), str(xl_lcm["unet"]))
    assert not takes_guidance_embedding(str(tiny_xl_checkpoints["xl"]))
    assert not takes_guidance_embedding(str(tmp_path / "missing.safetensors"))  # the loader reports it later
