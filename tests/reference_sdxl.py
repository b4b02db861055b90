"""diffusers' SDXL parts (UNet, VAE, both text encoders and tokenizers) from our tiny SDXL checkpoints, converted by
diffusers' single-file code, and the settings the comparisons against them share."""
from __future__ import annotations

from pathlib import Path

import torch
import transformers
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders import single_file_utils
from omegaconf import OmegaConf

from checkpoint_factory import TEST_CONFIGS
from ldm.checkpoints import read_checkpoint
from reference_text import for_transformers, hf_text_config

PROMPTS = ["a red circle on a blue background", "a lighthouse at dusk"]
SCALE = 5.0
SCHEDULE = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def diffusers_parts(checkpoint_path: Path, family: str, vocabulary: Path) -> dict:
    """diffusers' UNet, VAE and text encoders from our checkpoint, converted by diffusers' single-file code."""
    checkpoint, _ = read_checkpoint(checkpoint_path)
    original = OmegaConf.to_container(OmegaConf.load(str(TEST_CONFIGS / f"tiny-{family}.yaml")))
    unet_config = single_file_utils.create_unet_diffusers_config_from_ldm(original, checkpoint)
    # diffusers recognises SDXL by its released context widths (2048, 1280); the tiny model states its own sizes
    size_embedding = original["model"]["params"]["conditioner_config"]["params"]["emb_models"][-1]["params"]["outdim"]
    unet_config.update(addition_embed_type="text_time", addition_time_embed_dim=size_embedding, class_embed_type=None)
    unet = UNet2DConditionModel(**unet_config)
    unet.load_state_dict(single_file_utils.convert_ldm_unet_checkpoint(checkpoint, unet_config), strict=True)
    vae_config = single_file_utils.create_vae_diffusers_config_from_ldm(original, checkpoint)
    vae = AutoencoderKL(**vae_config)
    vae.load_state_dict(single_file_utils.convert_ldm_vae_checkpoint(checkpoint, vae_config), strict=True)
    big_g_prefix = "conditioner.embedders.1.model." if family == "xl" else "conditioner.embedders.0.model."
    text_2 = transformers.CLIPTextModelWithProjection(hf_text_config(32, 3, 2, "gelu", projection_dim=16))
    text_2.load_state_dict(for_transformers(text_2, single_file_utils.convert_open_clip_checkpoint(
        text_2, checkpoint, prefix=big_g_prefix)), strict=True)
    parts = dict(unet=unet.eval(), vae=vae.eval(), text_encoder_2=text_2.eval(),
                 tokenizer_2=transformers.CLIPTokenizer.from_pretrained(str(vocabulary), pad_token="!",
                                                                        model_max_length=77))
    if family == "xl":
        text = transformers.CLIPTextModel(hf_text_config(32, 3, 2, "quick_gelu"))
        text.load_state_dict(for_transformers(text, single_file_utils.convert_ldm_clip_checkpoint(checkpoint)),
                             strict=True)
        parts.update(text_encoder=text.eval(), tokenizer=transformers.CLIPTokenizer.from_pretrained(
            str(vocabulary), pad_token="<|endoftext|>", model_max_length=77))
    return parts


def diffusers_vector(unet: UNet2DConditionModel, pooled: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
    """What diffusers' UNet feeds its add_embedding: pooled text, then every time id's sinusoidal embedding."""
    return torch.cat([pooled, unet.add_time_proj(time_ids.flatten()).reshape(pooled.shape[0], -1)], dim=-1)
