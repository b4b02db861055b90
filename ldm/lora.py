"""Apply a kohya-style LoRA file to a loaded model by merging it into the weights: W += m * alpha / rank * up @ down.

Module names are kohya's, as sd-scripts, A1111 and ComfyUI write them:
- `lora_unet_` + a path under `model.diffusion_model` with dots as underscores
  (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`, what kohya's SDXL scripts write). Kohya's SD 1.x/2.x
  files name the attention blocks as diffusers does (`lora_unet_down_blocks_0_attentions_0_...`, also found in
  diffusers-trained SDXL LoRAs converted to kohya's format); those block names are translated to the UNet's own.
- the text encoders in Hugging Face CLIP names (`..._text_model_encoder_layers_0_self_attn_q_proj`, `_mlp_fc1`):
  `lora_te_` for a model with one text encoder (SD 1.x CLIP, SD 2.x OpenCLIP ViT-H, the SDXL refiner's OpenCLIP
  bigG), `lora_te1_` / `lora_te2_` for SDXL base's CLIP ViT-L / OpenCLIP bigG. On an OpenCLIP tower `q/k/v_proj`
  are row blocks of the fused `attn.in_proj_weight`, `out_proj` is `attn.out_proj`, `mlp_fc1` / `mlp_fc2` are
  `mlp.c_fc` / `mlp.c_proj`.
Each module has `.lora_down.weight`, `.lora_up.weight` and optionally `.alpha` (default: the rank). Linear layers,
1x1 convolutions and kxk convolutions (LoCon: a kxk down and a 1x1 up) are supported.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch
from torch import nn

from ldm.checkpoints import CheckpointError, read_checkpoint
from ldm.modules.encoders.clip_text import CLIPTextModel
from ldm.modules.encoders.open_clip_text import OpenCLIPTextTransformer

UNET_PREFIX = "lora_unet_"
TEXT_ENCODER_PREFIX = "lora_te_"
KOHYA_MODULE = re.compile(r"^lora_(?:unet|te\d*)_")
TEXT_ENCODER_MODULE = re.compile(r"^lora_te\d*_")
PARTS = ("lora_down.weight", "lora_up.weight", "alpha")
# diffusers' names of the UNet's attention blocks, in kohya's underscore spelling
DIFFUSERS_ATTENTION = re.compile(r"^lora_unet_(?:down_blocks_(\d+)_attentions_(\d+)|(mid_block_attentions_0)"
                                 r"|up_blocks_(\d+)_attentions_(\d+))_(.+)$")


class LoraError(Exception):
    """A LoRA file that does not fit the model; the message says what and what to do."""


@dataclass(frozen=True)
class LoraTarget:
    """The weight a LoRA module changes: a layer's whole weight, or a block of rows of a fused one."""
    parameter: torch.Tensor
    rows: slice | None = None

    @property
    def weight(self) -> torch.Tensor:
        """The changed weight; a view when it is a block of rows, so writing to it writes the model's weight."""
        return self.parameter if self.rows is None else self.parameter[self.rows]


def kohya_name(prefix: str, module_path: str) -> str:
    return prefix + module_path.replace(".", "_")


def text_encoder_prefixes(count: int) -> list[str]:
    """Kohya numbers the text encoders only when a model has several (SDXL base: te1 CLIP ViT-L, te2 bigG)."""
    return [TEXT_ENCODER_PREFIX] if count == 1 else [f"lora_te{index}_" for index in range(1, count + 1)]


def open_clip_layers(tower: nn.Module) -> Iterator[tuple[str, LoraTarget]]:
    """(Hugging Face CLIP path, target) for the attention and MLP weights of an OpenCLIP text tower: kohya trains on
    the Hugging Face layout, whose separate q/k/v projections are row blocks of open_clip's fused in_proj."""
    for index, block in enumerate(tower.transformer.resblocks):
        layer = f"text_model.encoder.layers.{index}."
        width = block.attn.out_proj.in_features
        for part, name in enumerate(("q_proj", "k_proj", "v_proj")):
            yield f"{layer}self_attn.{name}", LoraTarget(block.attn.in_proj_weight,
                                                         slice(part * width, (part + 1) * width))
        yield f"{layer}self_attn.out_proj", LoraTarget(block.attn.out_proj.weight)
        yield f"{layer}mlp.fc1", LoraTarget(block.mlp.c_fc.weight)
        yield f"{layer}mlp.fc2", LoraTarget(block.mlp.c_proj.weight)


def text_encoders(model: nn.Module) -> list[nn.Module]:
    """The model's CLIP and OpenCLIP text towers in conditioning order (SDXL: embedders.0, then embedders.1)."""
    conditioning = getattr(model, "cond_stage_model", None)
    if not isinstance(conditioning, nn.Module):
        return []
    return [module for module in conditioning.modules() if isinstance(module, (CLIPTextModel, OpenCLIPTextTransformer))]


def lora_targets(model: nn.Module) -> dict[str, LoraTarget]:
    """Kohya module name -> target, for every linear and convolution layer a LoRA file may address."""
    targets: dict[str, LoraTarget] = {}
    for path, module in model.model.diffusion_model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            targets[kohya_name(UNET_PREFIX, path)] = LoraTarget(module.weight)
    encoders = text_encoders(model)
    for prefix, encoder in zip(text_encoder_prefixes(len(encoders)), encoders):
        if isinstance(encoder, OpenCLIPTextTransformer):
            layers = open_clip_layers(encoder)
        else:
            layers = ((path, LoraTarget(module.weight)) for path, module in encoder.named_modules()
                      if isinstance(module, nn.Linear))
        targets.update((kohya_name(prefix, path), target) for path, target in layers)
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
        if part in PARTS and KOHYA_MODULE.match(module):
            parts.setdefault(module, {})[part] = value
        else:
            foreign.append(key)
    if foreign:
        raise LoraError(f"{len(foreign)} key(s) are not kohya LoRA weights (e.g. {', '.join(sorted(foreign)[:3])}): "
                        "only lora_unet_* / lora_te_* / lora_te1_* / lora_te2_* files with lora_down, lora_up and "
                        "alpha are supported (not LyCORIS LoHa/LoKr, not diffusers/PEFT names)")
    updates = {}
    for module, tensors in parts.items():
        if "lora_down.weight" not in tensors or "lora_up.weight" not in tensors:
            raise LoraError(f"LoRA module {module} lacks lora_down or lora_up weights: the file is incomplete")
        down, up = tensors["lora_down.weight"], tensors["lora_up.weight"]
        check_pair(module, down, up)
        alpha = alpha_value(module, tensors["alpha"]) if "alpha" in tensors else float(down.shape[0])
        updates[module] = LoraUpdate(down, up, alpha)
    return updates


def check_pair(module: str, down: torch.Tensor, up: torch.Tensor) -> None:
    """LoraError unless `down` [rank, in] / [rank, in, k, k] and `up` [out, rank] / [out, rank, 1, 1] are
    floating-point matrices (or LoCon kernels) of one rank above zero."""
    for part, tensor in (("lora_down", down), ("lora_up", up)):
        if not torch.is_tensor(tensor) or not tensor.is_floating_point():
            kind = tensor.dtype if torch.is_tensor(tensor) else type(tensor).__name__
            raise LoraError(f"LoRA module {module}: {part} holds {kind} numbers, not floating-point weights; the "
                            "file is damaged or crafted")
        if tensor.ndim not in (2, 4) or tensor.numel() == 0:
            raise LoraError(f"LoRA module {module}: {part} has shape {list(tensor.shape)}, not a non-empty matrix "
                            "or convolution kernel; the file is damaged or crafted")
    if up.shape[1] != down.shape[0]:
        raise LoraError(f"LoRA module {module}: lora_up has rank {up.shape[1]} but lora_down rank {down.shape[0]} "
                        f"(shapes {list(up.shape)} / {list(down.shape)}); the file is damaged or crafted")


def alpha_value(module: str, alpha: torch.Tensor) -> float:
    """A module's alpha as a float: one finite real number (kohya writes a 0-d tensor)."""
    if not torch.is_tensor(alpha) or alpha.numel() != 1 or alpha.dtype == torch.bool or alpha.is_complex():
        shape = list(alpha.shape) if torch.is_tensor(alpha) else type(alpha).__name__
        raise LoraError(f"LoRA module {module}: alpha is {shape}"
                        f"{f' {alpha.dtype}' if torch.is_tensor(alpha) else ''}, not one number; the file is damaged "
                        "or crafted")
    value = float(alpha.reshape(()))
    if not math.isfinite(value):
        raise LoraError(f"LoRA module {module}: alpha is {value}, not a finite number; the file is damaged or crafted")
    return value


def read_lora(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a LoRA file (.safetensors, or a torch pickle read safely)."""
    try:
        state_dict, _ = read_checkpoint(path)
    except CheckpointError as error:  # its message names the file already
        raise LoraError(str(error)) from None
    return state_dict


def lora_state_dict(lora: str | os.PathLike | Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
    """The tensors of `lora`: a file (read) or a state dict already."""
    return read_lora(lora) if isinstance(lora, (str, os.PathLike)) else lora


def unknown_hint(unknown: list[str], model: nn.Module) -> str:
    """Why LoRA module names may be missing from `model`, in parentheses, or ""."""
    encoder_prefixes = text_encoder_prefixes(len(text_encoders(model)))
    foreign = sorted({match.group() for match in map(TEXT_ENCODER_MODULE.match, unknown) if match}
                     - set(encoder_prefixes))
    if foreign:
        made_for = "SD 1.x/2.x or the SDXL refiner" if foreign == [TEXT_ENCODER_PREFIX] else "SDXL base"
        takes = f"{'/'.join(encoder_prefixes)} names" if encoder_prefixes else "no text-encoder LoRA"
        return f" ({'/'.join(foreign)} name the text encoders of {made_for}; this model takes {takes})"
    if any("_resnets_" in name or "samplers_" in name for name in unknown):
        return " (diffusers-style names are supported for attention blocks only, not res blocks)"
    return ""


def fitted_updates(model: nn.Module,
                   state_dict: Mapping[str, torch.Tensor]) -> list[tuple[str, LoraTarget, LoraUpdate]]:
    """Each module of a LoRA state dict with the weight of `model` it changes; LoraError unless every module exists
    and fits. Only names and shapes are looked at, so `model` may hold its parameters on the meta device."""
    num_res_blocks = list(model.model.diffusion_model.num_res_blocks)
    updates = {ldm_module_name(name, num_res_blocks): update
               for name, update in group_lora_state_dict(state_dict).items()}
    if not updates:
        raise LoraError("the LoRA holds no modules")
    targets = lora_targets(model)
    unknown = sorted(name for name in updates if name not in targets)
    if unknown:
        raise LoraError(f"{len(unknown)} LoRA module(s) do not exist in this model, e.g. {', '.join(unknown[:3])}"
                        f"{unknown_hint(unknown, model)}: is the LoRA made for another base model?")
    for name, update in updates.items():
        weight = targets[name].weight
        expected = update.up.shape[0], update.down.flatten(1).shape[1]
        if (weight.shape[0], weight[0].numel()) != expected or update.up.flatten(1).shape[1] != update.rank:
            raise LoraError(f"LoRA module {name} has shapes down {list(update.down.shape)} / up "
                            f"{list(update.up.shape)} that do not fit the layer's weight {list(weight.shape)}: "
                            "is the LoRA made for another base model?")
    return [(name, targets[name], update) for name, update in updates.items()]


def check_lora(model: nn.Module, lora: str | os.PathLike | Mapping[str, torch.Tensor]) -> int:
    """LoraError for whatever `apply_lora(model, lora)` would refuse, without changing `model` (which may hold its
    parameters on the meta device: a LoRA can be checked before the weights load). Returns the number of layers."""
    state_dict = lora_state_dict(lora)
    fitted = fitted_updates(model, state_dict)
    check_finite(state_dict)
    return len(fitted)


def check_finite(state_dict: Mapping[str, torch.Tensor]) -> None:
    """LoraError naming the first module whose lora_down, lora_up or alpha holds NaN or an infinity."""
    for name, update in group_lora_state_dict(state_dict).items():
        if not (torch.isfinite(update.down).all() and torch.isfinite(update.up).all()):
            raise LoraError(f"LoRA module {name} holds NaN or infinite weights: the file is damaged")


@torch.no_grad()
def apply_lora(model: nn.Module, lora: str | os.PathLike | Mapping[str, torch.Tensor],
               multiplier: float = 1.0, text_encoder_multiplier: float | None = None) -> int:
    """Merge `lora` (a file or its state dict) into `model` (a loaded LatentDiffusion or SDXL
    DiffusionEngine) with weight `multiplier`, its text-encoder layers with `text_encoder_multiplier` (default: the
    same; AUTOMATIC1111's `<lora:name:te:unet>` gives them apart).

    Every module must exist and fit, or nothing is changed and LoraError says which; returns how many layers were
    changed. Merging is exact up to the weights' precision; applying again with -multiplier undoes it.
    """
    state_dict = lora_state_dict(lora)
    text_multiplier = multiplier if text_encoder_multiplier is None else text_encoder_multiplier
    deltas = [(target, update.delta(target.weight.shape),
               multiplier if name.startswith(UNET_PREFIX) else text_multiplier)
              for name, target, update in fitted_updates(model, state_dict)]
    check_finite(state_dict)
    if not all(torch.isfinite(delta).all() for _, delta, _ in deltas):
        raise LoraError("the LoRA's changes to the weights hold NaN or infinite values (its weights are damaged or "
                        "too large): nothing was changed")
    for target, delta, scale in deltas:
        weight = target.weight
        weight.copy_((weight.float() + scale * delta.to(weight.device)).to(weight.dtype))
    return len(deltas)
