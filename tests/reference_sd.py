"""diffusers' Stable Diffusion 1.x / 2.x pipeline assembled from our tiny checkpoints with diffusers' own
original-checkpoint converters, and the settings the comparisons against it share."""
from __future__ import annotations

import transformers
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.loaders import single_file_utils
from omegaconf import OmegaConf

from checkpoint_factory import TEST_CONFIGS
from ldm.checkpoints import read_checkpoint
from reference_text import for_transformers, hf_text_config, write_hf_vocabulary

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


class CompVisNoisingDDIM(DDIMScheduler):
    """diffusers' DDIM noising the init image as CompVis' img2img does: one DDIM step above the first step run."""

    def add_noise(self, original_samples, noise, timesteps):
        return super().add_noise(original_samples, noise,
                                 timesteps + self.config.num_train_timesteps // self.num_inference_steps)
