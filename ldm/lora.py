"""Apply a kohya-style LoRA file to a loaded model by merging it into the weights: W += m * alpha / rank * up @ down.

Module names are the model's own paths with dots as underscores, `lora_unet_` + a path under
`model.diffusion_model` (`lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q`, the naming kohya's SDXL
scripts, ComfyUI and A1111 share) and `lora_te_` + a path under `cond_stage_model.transformer` for the CLIP text
encoder of SD 1.x (`lora_te_text_model_encoder_layers_0_self_attn_q_proj`). Each module has `.lora_down.weight`,
`.lora_up.weight` and optionally `.alpha` (default: the rank). Linear layers, 1x1 convolutions and kxk convolutions
(LoCon: a kxk down and a 1x1 up) are supported. Kohya's SD 1.x/2.x files name the UNet's attention blocks as
diffusers does (`lora_unet_down_blocks_0_attentions_0_...`); those block names are translated to the UNet's own.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

UNET_PREFIX = "lora_unet_"
TEXT_ENCODER_PREFIX = "lora_te_"
PARTS = ("lora_down.weight", "lora_up.weight", "alpha")
# diffusers' names of the UNet's attention blocks, in kohya's underscore spelling
DIFFUSERS_ATTENTION = re.compile(r"^lora_unet_(?:down_blocks_(\d+)_attentions_(\d+)|(mid_block_attentions_0)"
                                 r"|up_blocks_(\d+)_attentions_(\d+))_(.+)$")


class LoraError(Exception):
    """A LoRA file that does not fit the model; the message says what and what to do."""


def kohya_name(prefix: str, module_path: str) -> str:
    return prefix + module_path.replace(".", "_")


def lora_targets(model: nn.Module) -> dict[str, nn.Module]:
    """Kohya module name -> layer, for every linear and convolution layer a LoRA file may address."""
    targets: dict[str, nn.Module] = {}
    unet = model.model.diffusion_model
    for path, module in unet.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            targets[kohya_name(UNET_PREFIX, path)] = module
    transformer = getattr(model.cond_stage_model, "transformer", None)
    if transformer is not None:
        for path, module in transformer.named_modules():
            if isinstance(module, nn.Linear):
                targets[kohya_name(TEXT_ENCODER_PREFIX, path)] = module
    return targets


def ldm_module_name(name: str, num_res_blocks: list[int]) -> str:
    """A diffusers-style kohya name of an attention-block layer as the UNet's own (`down_blocks_1_attentions_0`
    -> `input_blocks_4_1` for SD's two res blocks per level); other names unchanged."""
    match = DIFFUSERS_ATTENTION.match(name)
    if match is None:
        return name
    down_level, down_block, middle, up_level, up_block, rest = match.groups()
    if middle:
        return f"{UNET_PREFIX}middle_block_1_{rest}"
    if down_level is not None:  # input_blocks: conv_in, then per level its res blocks and a downsampler
        index = 1 + sum(blocks + 1 for blocks in num_res_blocks[:int(down_level)]) + int(down_block)
        return f"{UNET_PREFIX}input_blocks_{index}_1_{rest}"
    upward = num_res_blocks[::-1]  # output_blocks: deepest level first, one block more per level
    index = sum(blocks + 1 for blocks in upward[:int(up_level)]) + int(up_block)
    return f"{UNET_PREFIX}output_blocks_{index}_1_{rest}"


@dataclass(frozen=True)
class LoraUpdate:
    down: torch.Tensor  # [rank, in] or [rank, in, k, k]
    up: torch.Tensor  # [out, rank] or [out, rank, 1, 1]
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self, weight_shape: torch.Size) -> torch.Tensor:
        """alpha / rank * up @ down in the layout of a weight of `weight_shape`, in float32."""
        up = self.up.float().flatten(1)  # [out, rank]
        down = self.down.float().flatten(1)  # [rank, in * k * k]
        return (up @ down).reshape(weight_shape) * (self.alpha / self.rank)


def group_lora_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, LoraUpdate]:
    """Module name -> LoraUpdate; keys that are not kohya LoRA parts are an error naming them."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    foreign = []
    for key, value in state_dict.items():
        module, _, part = key.partition(".")
        if part in PARTS and module.startswith((UNET_PREFIX, TEXT_ENCODER_PREFIX)):
            parts.setdefault(module, {})[part] = value
        else:
            foreign.append(key)
    if foreign:
        raise LoraError(f"{len(foreign)} key(s) are not kohya LoRA weights (e.g. {', '.join(sorted(foreign)[:3])}): "
                        "only lora_unet_* / lora_te_* files with lora_down, lora_up and alpha are supported "
                        "(not LyCORIS LoHa/LoKr, not diffusers/PEFT names)")
    updates = {}
    for module, tensors in parts.items():
        if "lora_down.weight" not in tensors or "lora_up.weight" not in tensors:
            raise LoraError(f"LoRA module {module} lacks lora_down or lora_up weights: the file is incomplete")
        down, up = tensors["lora_down.weight"], tensors["lora_up.weight"]
        alpha = float(tensors["alpha"]) if "alpha" in tensors else float(down.shape[0])
        updates[module] = LoraUpdate(down, up, alpha)
    return updates


def read_lora(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a LoRA file (.safetensors, or a torch pickle read safely)."""
    from ldm.checkpoints import CheckpointError, read_checkpoint

    try:
        state_dict, _ = read_checkpoint(path)
    except CheckpointError as error:
        raise LoraError(f"LoRA {path}: {error}") from None
    return state_dict


@torch.no_grad()
def apply_lora(model: nn.Module, lora: str | os.PathLike | Mapping[str, torch.Tensor],
               multiplier: float = 1.0) -> int:
    """Merge `lora` (a file or its state dict) into `model` (a loaded LatentDiffusion) with weight `multiplier`.

    Every module must exist and fit, or nothing is changed and LoraError says which; returns how many layers were
    changed. Merging is exact up to the weights' precision; applying again with -multiplier undoes it.
    """
    state_dict = read_lora(lora) if isinstance(lora, (str, os.PathLike)) else lora
    num_res_blocks = list(model.model.diffusion_model.num_res_blocks)
    updates = {ldm_module_name(name, num_res_blocks): update
               for name, update in group_lora_state_dict(state_dict).items()}
    if not updates:
        raise LoraError("the LoRA holds no modules")
    targets = lora_targets(model)
    unknown = sorted(name for name in updates if name not in targets)
    if unknown:
        hint = ""
        if any(name.startswith(TEXT_ENCODER_PREFIX) for name in unknown) and getattr(
                model.cond_stage_model, "transformer", None) is None:
            hint = " (text-encoder LoRAs need the CLIP text encoder of SD 1.x)"
        elif any("_resnets_" in name or "samplers_" in name for name in unknown):
            hint = " (diffusers-style names are supported for attention blocks only, not res blocks)"
        raise LoraError(f"{len(unknown)} LoRA module(s) do not exist in this model, e.g. {', '.join(unknown[:3])}"
                        f"{hint}: is the LoRA made for another base model?")
    deltas = {}
    for name, update in updates.items():
        weight = targets[name].weight
        expected = update.up.shape[0], update.down.flatten(1).shape[1]
        if (weight.shape[0], weight[0].numel()) != expected or update.up.flatten(1).shape[1] != update.rank:
            raise LoraError(f"LoRA module {name} has shapes down {list(update.down.shape)} / up "
                            f"{list(update.up.shape)} that do not fit the layer's weight {list(weight.shape)}: "
                            "is the LoRA made for another base model?")
        deltas[name] = update.delta(weight.shape)
    for name, delta in deltas.items():
        weight = targets[name].weight
        weight.copy_((weight.float() + multiplier * delta.to(weight.device)).to(weight.dtype))
    return len(deltas)
