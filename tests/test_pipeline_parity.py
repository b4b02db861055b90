"""Whole-pipeline checks: the same image as diffusers' StableDiffusionPipeline on the same weights and noise, and
CompVis-style script code (instantiate_from_config + load_state_dict + DDIMSampler) running unchanged."""
from __future__ import annotations

import pytest
import torch
import transformers
from diffusers import AutoencoderKL, DDIMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders import single_file_utils
from omegaconf import OmegaConf

from checkpoint_factory import TEST_CONFIGS
from ldm.checkpoints import read_checkpoint
from ldm.loading import load_model
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.plms import PLMSSampler
from ldm.util import instantiate_from_config
from test_text_encoders import for_transformers, hf_text_config
from test_tokenizer import write_hf_vocabulary

PROMPT, NEGATIVE, STEPS, SCALE = "a red circle on a blue background", "blurry", 10, 7.5
SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                set_alpha_to_one=False)


def diffusers_unet_and_vae(checkpoint: dict, config: str) -> tuple[UNet2DConditionModel, AutoencoderKL]:
    """diffusers' UNet and VAE from our checkpoint's tensors (made from tests/configs/`config`), converted by
    diffusers' own original-checkpoint converters, in eval mode."""
    original = OmegaConf.to_container(OmegaConf.load(str(TEST_CONFIGS / config)))
    unet_config = single_file_utils.create_unet_diffusers_config_from_ldm(original, checkpoint)
    unet = UNet2DConditionModel(**unet_config)
    unet.load_state_dict(single_file_utils.convert_ldm_unet_checkpoint(checkpoint, unet_config), strict=True)
    vae_config = single_file_utils.create_vae_diffusers_config_from_ldm(original, checkpoint)
    vae = AutoencoderKL(**vae_config)
    vae.load_state_dict(single_file_utils.convert_ldm_vae_checkpoint(checkpoint, vae_config), strict=True)
    return unet.eval(), vae.eval()


def diffusers_pipeline(checkpoint_path, tmp_path, scheduler, config: str = "tiny-v1.yaml") -> StableDiffusionPipeline:
    """diffusers' pipeline assembled from our checkpoint file (made from tests/configs/`config`) with diffusers' own
    original-checkpoint converters."""
    checkpoint, _ = read_checkpoint(checkpoint_path)
    unet, vae = diffusers_unet_and_vae(checkpoint, config)
    text = transformers.CLIPTextModel(hf_text_config(32, 2, 2, "quick_gelu"))
    text.load_state_dict(for_transformers(text, single_file_utils.convert_ldm_clip_checkpoint(checkpoint)),
                         strict=True)
    write_hf_vocabulary(tmp_path)
    tokenizer = transformers.CLIPTokenizer.from_pretrained(str(tmp_path), pad_token="<|endoftext|>",
                                                           model_max_length=77)
    pipe = StableDiffusionPipeline(vae=vae.eval(), text_encoder=text.eval(), tokenizer=tokenizer, unet=unet.eval(),
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def our_images(model, sampler_class, x_T: torch.Tensor) -> torch.Tensor:
    c = model.get_learned_conditioning([PROMPT])
    uc = model.get_learned_conditioning([NEGATIVE])
    samples, _ = sampler_class(model).sample(S=STEPS, conditioning=c, batch_size=1, shape=[4, 8, 8], verbose=False,
                                             unconditional_guidance_scale=SCALE, unconditional_conditioning=uc,
                                             eta=0.0, x_T=x_T)
    return ((model.decode_first_stage(samples) + 1) / 2).clamp(0, 1)


@pytest.mark.parametrize("sampler_class, scheduler", [
    (DDIMSampler, DDIMScheduler(clip_sample=False, timestep_spacing="leading", **SCHEDULE)),
    (PLMSSampler, PNDMScheduler(skip_prk_steps=True, timestep_spacing="leading", **SCHEDULE)),
], ids=["ddim", "plms"])
@torch.no_grad()
def test_same_image_as_diffusers_pipeline(tiny_checkpoint, tmp_path, sampler_class, scheduler):
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    ours = our_images(load_model(tiny_checkpoint, TEST_CONFIGS / "tiny-v1.yaml"), sampler_class, x_T)
    pipe = diffusers_pipeline(tiny_checkpoint, tmp_path, scheduler)
    reference = pipe(PROMPT, negative_prompt=NEGATIVE, height=64, width=64, num_inference_steps=STEPS,
                     guidance_scale=SCALE, latents=x_T.clone(), output_type="pt").images
    assert ours.shape == reference.shape == (1, 3, 64, 64)
    assert reference.std() > 0.01  # a real image, not a constant
    torch.testing.assert_close(ours, reference, atol=2e-5, rtol=0)


@torch.no_grad()
def test_compvis_script_code_runs_unchanged(tiny_checkpoint):
    """What CompVis' txt2img does by hand: build from the yaml, load the Lightning state dict, sample, decode."""
    config = OmegaConf.load(str(TEST_CONFIGS / "tiny-v1.yaml"))
    pl_sd = torch.load(tiny_checkpoint, map_location="cpu", weights_only=True)
    model = instantiate_from_config(config.model)
    missing, unexpected = model.load_state_dict(pl_sd["state_dict"], strict=False)
    assert missing == [] and unexpected == []
    model.eval()
    torch.manual_seed(42)  # CompVis scripts seed globally; samplers given no noise draw their seeds from it
    with model.ema_scope():
        first = our_images(model, DDIMSampler, None)
    torch.manual_seed(42)
    second = our_images(load_model(tiny_checkpoint, TEST_CONFIGS / "tiny-v1.yaml"), DDIMSampler, None)
    torch.testing.assert_close(first, second, atol=0, rtol=0)
