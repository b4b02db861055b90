"""Tiny random checkpoints in the released key layout, written as real users' files are (.ckpt and .safetensors)."""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from ldm.util import instantiate_from_config

TEST_CONFIGS = Path(__file__).resolve().parent / "configs"


def random_state_dict(config_path: str | Path, seed: int = 0, overrides: dict | None = None) -> dict[str, torch.Tensor]:
    """Every parameter of the config's model drawn at random (zero-initialised layers too), buffers as built."""
    config = OmegaConf.load(str(config_path))
    if overrides:
        config = OmegaConf.merge(config, OmegaConf.create({"model": {"params": overrides}}))
    model = instantiate_from_config(config.model)
    generator = torch.Generator().manual_seed(seed)
    state_dict, parameters = {}, dict(model.named_parameters())
    for name, tensor in model.state_dict().items():
        if name in parameters:
            fan_in = tensor[0].numel() if tensor.ndim > 1 else 1
            scale = (1.0 / fan_in) ** 0.5 if tensor.ndim > 1 else 0.1
            tensor = torch.randn(tensor.shape, generator=generator) * scale
            if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "norm3.weight", "norm_out.weight",
                              "ln_1.weight", "ln_2.weight", "ln_final.weight", "layer_norm1.weight",
                              "layer_norm2.weight", "final_layer_norm.weight", "in_layers.0.weight",
                              "out_layers.0.weight", "out.0.weight")):
                tensor = 1.0 + tensor  # normalisation gains near one keep activations in range
        state_dict[name] = tensor.contiguous().clone()
    return state_dict


def write_checkpoint(state_dict: dict[str, torch.Tensor], path: str | Path, lightning: bool = True) -> Path:
    """`.safetensors` by suffix, else a torch zip pickle (Lightning-style `{"state_dict": ...}` when `lightning`)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(state_dict, str(path))
    else:
        torch.save({"state_dict": state_dict, "global_step": 470000, "epoch": 6} if lightning else state_dict, path)
    return path


def make_tiny_checkpoint(path: str | Path, family: str = "v1", seed: int = 0) -> Path:
    """A tiny checkpoint at `path` from tests/configs/tiny-<family>.yaml: "v1", "v2" or "v1-inpainting" (9-channel)."""
    return write_checkpoint(random_state_dict(TEST_CONFIGS / f"tiny-{family}.yaml", seed), path)


def make_tiny_xl_checkpoint(path: str | Path, family: str = "xl", seed: int = 0) -> Path:
    """A tiny SDXL base ("xl") or refiner ("xl-refiner") checkpoint at `path` from tests/configs/tiny-<family>.yaml,
    holding what the released SDXL files hold: no CompVis schedule buffers."""
    from ldm.loading import SCHEDULE_KEYS

    state_dict = random_state_dict(TEST_CONFIGS / f"tiny-{family}.yaml", seed)
    return write_checkpoint({key: value for key, value in state_dict.items() if key not in SCHEDULE_KEYS}, path)


def make_tiny_controlnet(path: str | Path, seed: int = 5) -> Path:
    """A tiny ControlNet 1.1-style file at `path` (`control_model.*` keys alone, a bare state dict) drawn from
    tests/configs/tiny-cldm-v1.yaml, whose base UNet is tiny-v1's."""
    state_dict = random_state_dict(TEST_CONFIGS / "tiny-cldm-v1.yaml", seed)
    control = {key: value for key, value in state_dict.items() if key.startswith("control_model.")}
    return write_checkpoint(control, path, lightning=False)


LORA_LAYERS = {  # kohya name -> checkpoint key of the layer it changes
    "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q":
        "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight",
    "lora_unet_middle_block_1_proj_in":
        "model.diffusion_model.middle_block.1.proj_in.weight",
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj":
        "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
}


def write_lora(path: Path, state_dict: dict[str, torch.Tensor], rank: int = 2, alpha: float = 1.0) -> dict:
    """A random kohya LoRA for the tiny model's layers, and each layer's delta per unit weight (computed here)."""
    generator = torch.Generator().manual_seed(3)
    lora, deltas = {}, {}
    for name, key in LORA_LAYERS.items():
        weight = state_dict[key]
        down = torch.randn(rank, *weight.shape[1:], generator=generator)
        up = torch.randn(weight.shape[0], rank, *([1] * (weight.ndim - 2)), generator=generator) * 0.5
        lora.update({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up,
                     f"{name}.alpha": torch.tensor(alpha)})
        deltas[key] = torch.einsum("or,ri->oi", up.flatten(1), down.flatten(1)).reshape(weight.shape) * alpha / rank
    write_checkpoint(lora, path)
    return deltas
