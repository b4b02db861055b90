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


# (diffusers' transformer_layers_per_block, reverse_transformer_layers_per_block) of SSD-1B and Segmind Vega
DIFFUSERS_DEPTHS = {"ssd1b": ([1, 2, 4], [[4, 4, 10], [2, 1, 1], [1, 1, 1]]),
                    "vega": ([1, 1, 2], [[2, 2, 2], [1, 1, 1], [1, 1, 1]])}


def distilled_unet_config(family: str, widths: tuple[int, ...] = (64, 128, 128), heads: tuple[int, ...] = (1, 2, 2),
                          context: int = 128, time_embedding: int = 8, vector: int = 80) -> dict:
    """diffusers' UNet2DConditionModel config of an SSD-1B ("ssd1b") or Vega ("vega") UNet: the released block
    structure at the given widths (the defaults are the tiny tests/configs/tiny-<family>.yaml)."""
    layers, reverse = DIFFUSERS_DEPTHS[family]
    return dict(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=widths,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), mid_block_type="UNetMidBlock2D",
        attention_head_dim=heads, cross_attention_dim=context, use_linear_projection=True,
        transformer_layers_per_block=layers, reverse_transformer_layers_per_block=reverse,
        addition_embed_type="text_time", addition_time_embed_dim=time_embedding,
        projection_class_embeddings_input_dim=vector)


def _text_sizes(embedder: dict) -> tuple[int, int, int]:
    params = embedder["params"]
    return params["width"], params["layers"], params["heads"]


def diffusers_parts(checkpoint_path: Path, family: str, vocabulary: Path) -> dict:
    """diffusers' UNet, VAE and text encoders from our checkpoint (tests/configs/tiny-`family`.yaml: "xl",
    "xl-refiner", "ssd1b", "vega"), converted by diffusers' single-file code."""
    checkpoint, _ = read_checkpoint(checkpoint_path)
    original = OmegaConf.to_container(OmegaConf.load(str(TEST_CONFIGS / f"tiny-{family}.yaml")))
    embedders = original["model"]["params"]["conditioner_config"]["params"]["emb_models"]
    if family in DIFFUSERS_DEPTHS:
        unet_config = distilled_unet_config(family)
    else:
        unet_config = single_file_utils.create_unet_diffusers_config_from_ldm(original, checkpoint)
        # diffusers recognises SDXL by its released context widths (2048, 1280); the tiny model states its own sizes
        size_embedding = embedders[-1]["params"]["outdim"]
        unet_config.update(addition_embed_type="text_time", addition_time_embed_dim=size_embedding,
                           class_embed_type=None)
    unet = UNet2DConditionModel(**unet_config)
    unet.load_state_dict(single_file_utils.convert_ldm_unet_checkpoint(checkpoint, unet_config), strict=True)
    vae_config = single_file_utils.create_vae_diffusers_config_from_ldm(original, checkpoint)
    vae = AutoencoderKL(**vae_config)
    vae.load_state_dict(single_file_utils.convert_ldm_vae_checkpoint(checkpoint, vae_config), strict=True)
    base = family != "xl-refiner"
    big_g = embedders[1] if base else embedders[0]
    text_2 = transformers.CLIPTextModelWithProjection(hf_text_config(*_text_sizes(big_g), "gelu",
                                                                     projection_dim=big_g["params"]["embed_dim"]))
    text_2.load_state_dict(for_transformers(text_2, single_file_utils.convert_open_clip_checkpoint(
        text_2, checkpoint, prefix="conditioner.embedders.1.model." if base else "conditioner.embedders.0.model.")),
        strict=True)
    parts = dict(unet=unet.eval(), vae=vae.eval(), text_encoder_2=text_2.eval(),
                 tokenizer_2=transformers.CLIPTokenizer.from_pretrained(str(vocabulary), pad_token="!",
                                                                        model_max_length=77))
    if base:
        text = transformers.CLIPTextModel(hf_text_config(*_text_sizes(embedders[0]), "quick_gelu"))
        text.load_state_dict(for_transformers(text, single_file_utils.convert_ldm_clip_checkpoint(checkpoint)),
                             strict=True)
        parts.update(text_encoder=text.eval(), tokenizer=transformers.CLIPTokenizer.from_pretrained(
            str(vocabulary), pad_token="<|endoftext|>", model_max_length=77))
    return parts


def diffusers_vector(unet: UNet2DConditionModel, pooled: torch.Tensor, time_ids: torch.Tensor) -> torch.Tensor:
    """What diffusers' UNet feeds its add_embedding: pooled text, then every time id's sinusoidal embedding."""
    return torch.cat([pooled, unet.add_time_proj(time_ids.flatten()).reshape(pooled.shape[0], -1)], dim=-1)
