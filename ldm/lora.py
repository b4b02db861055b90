"""Apply a LoRA file to a loaded model by merging it into the weights: W += m * alpha / rank * up @ down.

Module names are kohya's, as sd-scripts, A1111 and ComfyUI write them:
- `lora_unet_` + a path under `model.diffusion_model` with dots as underscores
  (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`, what kohya's SDXL scripts write), or the same with
  diffusers' block names (`lora_unet_down_blocks_1_attentions_0_...`, `lora_unet_down_blocks_0_resnets_0_conv1`,
  `..._downsamplers_0_conv`, `lora_unet_time_embedding_linear_1`, `lora_unet_conv_in`: kohya's SD 1.x/2.x files,
  and LCM-LoRA's), translated to the UNet's own by `ldm.diffusers_names`.
- the text encoders in Hugging Face CLIP names (`..._text_model_encoder_layers_0_self_attn_q_proj`, `_mlp_fc1`):
  `lora_te_` for a model with one text encoder (SD 1.x CLIP, SD 2.x OpenCLIP ViT-H, the SDXL refiner's OpenCLIP
  bigG), `lora_te1_` / `lora_te2_` for SDXL base's CLIP ViT-L / OpenCLIP bigG. On an OpenCLIP tower `q/k/v_proj`
  are row blocks of the fused `attn.in_proj_weight`, `out_proj` is `attn.out_proj`, `mlp_fc1` / `mlp_fc2` are
  `mlp.c_fc` / `mlp.c_proj`.
Each module has `.lora_down.weight`, `.lora_up.weight` and optionally `.alpha` (default: the rank). Linear layers,
1x1 convolutions and kxk convolutions (LoCon: a kxk down and a 1x1 up) are supported.

diffusers' and PEFT's files are read into those names first (`kohya_state_dict`): `unet.` / `text_encoder.` /
`text_encoder_2.` + a diffusers module path, with `lora_A.weight` / `lora_B.weight` (PEFT, as
`save_lora_weights` writes them) or `lora.down.weight` / `lora.up.weight`, and `.alpha` where given; a PEFT file's
`lora_alpha` and `alpha_pattern` come from the `lora_adapter_metadata` diffusers stores in the safetensors header
(without it, alpha is the rank, as diffusers assumes).
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from typing import Iterator, Mapping

import torch
from torch import nn

from ldm.checkpoints import CheckpointError, read_checkpoint
from ldm.diffusers_names import UNetLayout, ldm_unet_name
from ldm.modules.encoders.clip_text import CLIPTextModel
from ldm.modules.encoders.open_clip_text import OpenCLIPTextTransformer

UNET_PREFIX = "lora_unet_"
TEXT_ENCODER_PREFIX = "lora_te_"
KOHYA_MODULE = re.compile(r"^lora_(?:unet|te\d*)_")
TEXT_ENCODER_MODULE = re.compile(r"^lora_te\d*_")
PARTS = ("lora_down.weight", "lora_up.weight", "alpha")
# a kohya UNet module named with diffusers' blocks; the words of diffusers' module names that hold an underscore
DIFFUSERS_UNET_MODULE = re.compile(r"^lora_unet_(?:down_blocks|mid_block|up_blocks|conv_in|conv_out|time_embedding|"
                                   r"add_embedding)(?:_|$)")
DIFFUSERS_WORDS = sorted(("down_blocks", "mid_block", "up_blocks", "transformer_blocks", "time_emb_proj",
                          "conv_shortcut", "proj_in", "proj_out", "to_q", "to_k", "to_v", "to_out", "time_embedding",
                          "add_embedding", "linear_1", "linear_2", "conv_in", "conv_out"), key=len, reverse=True)
# a diffusers / PEFT LoRA key: optional component, module path, and its part (PEFT may name its adapter)
DIFFUSERS_KEY = re.compile(r"^(?:(?P<component>unet|text_encoder|text_encoder_2)\.)?(?:base_model\.model\.)?"
                           r"(?P<module>.+?)\.(?:lora_(?P<peft>[AB])(?:\.[^.]+)?\.weight"
                           r"|lora(?:_linear_layer)?\.(?P<diffusers>down|up)\.weight|(?P<alpha>alpha))$")
KOHYA_PART = {"A": "lora_down.weight", "B": "lora_up.weight", "down": "lora_down.weight", "up": "lora_up.weight"}
ADAPTER_METADATA = "lora_adapter_metadata"  # diffusers' safetensors metadata key for PEFT's LoraConfig, per component


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


def ldm_module_name(name: str, layout: UNetLayout) -> str:
    """A kohya UNet module named with diffusers' blocks as the UNet's own (`lora_unet_down_blocks_1_attentions_0_proj_in`
    -> `lora_unet_input_blocks_4_1_proj_in` for SD's two res blocks per level); other names, and diffusers names
    with no counterpart here, unchanged (they are reported as unknown modules)."""
    if not DIFFUSERS_UNET_MODULE.match(name):
        return name
    dotted = name[len(UNET_PREFIX):].replace("_", ".")
    for word in DIFFUSERS_WORDS:
        dotted = dotted.replace(word.replace("_", "."), word)
    try:
        return kohya_name(UNET_PREFIX, ldm_unet_name(dotted, layout))
    except (KeyError, ValueError):
        return name


def kohya_state_dict(state_dict: Mapping[str, torch.Tensor], text_encoder_count: int) -> dict[str, torch.Tensor]:
    """A LoRA's tensors under kohya's names: diffusers' and PEFT's keys (`unet.down_blocks.0.attentions.0.proj_in.
    lora_A.weight`, `text_encoder_2.text_model...lora.up.weight`, `...alpha`) renamed, kohya's kept; keys of neither
    kind are kept for `group_lora_state_dict` to name. `text_encoder_count` says whether `text_encoder.` is kohya's
    `lora_te_` (one text encoder) or `lora_te1_` (SDXL base)."""
    encoders = text_encoder_prefixes(max(text_encoder_count, 1))
    prefixes = {"unet": UNET_PREFIX, "text_encoder": encoders[0], "text_encoder_2": "lora_te2_"}
    converted = {}
    for key, value in state_dict.items():
        match = None if KOHYA_MODULE.match(key) else DIFFUSERS_KEY.match(key)
        if match is None:
            converted[key] = value
            continue
        module = match["module"]
        component = match["component"] or ("text_encoder" if module.startswith("text_model.") else "unet")
        if component != "unet" and not module.startswith("text_model."):
            module = "text_model." + module  # transformers 5's CLIPTextModel has no text_model level
        part = "alpha" if match["alpha"] else KOHYA_PART[match["peft"] or match["diffusers"]]
        converted[f"{kohya_name(prefixes[component], module)}.{part}"] = value
    return converted


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
        raise LoraError(f"{len(foreign)} key(s) are not kohya LoRA weights (e.g. {', '.join(sorted(foreign)[:3])}), "
                        "nor diffusers' or PEFT's: lora_unet_* / lora_te*_* files with lora_down, lora_up and alpha, "
                        "and unet.* / text_encoder*.* files with lora_A and lora_B (or lora.down and lora.up) are "
                        "supported, not LyCORIS LoHa/LoKr or DoRA")
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
    """The tensors of a LoRA file (.safetensors, or a torch pickle read safely), with the alphas a PEFT file's
    metadata gives added as `<module>.alpha`."""
    try:
        state_dict, _ = read_checkpoint(path)
    except CheckpointError as error:  # its message names the file already
        raise LoraError(str(error)) from None
    adapters = safetensors_metadata(path).get(ADAPTER_METADATA)
    return {**state_dict, **metadata_alphas(state_dict, adapters, path)} if adapters else state_dict


def safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata of a .safetensors file's header ({} for other files, or one that cannot be read: the
    loaders report those in their turn)."""
    if not os.fspath(path).lower().endswith(".safetensors") or not os.path.isfile(path):
        return {}
    from safetensors import safe_open

    try:
        with safe_open(os.fspath(path), framework="numpy") as handle:  # reads the header only
            return dict(handle.metadata() or {})
    except Exception:  # noqa: BLE001 - SafetensorError, OSError: the file itself is refused when read
        return {}


def metadata_alphas(state_dict: Mapping[str, torch.Tensor], adapters: str,
                    path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """`<module>.alpha` for each PEFT module (`...lora_A.weight`) of `state_dict`, from diffusers' adapter metadata:
    per component (`unet.`, `text_encoder.`, ...) PEFT's `lora_alpha`, its `alpha_pattern` (a module whose name is
    or ends in a key's module name takes that alpha: diffusers writes module names there; they are not run as
    regular expressions) and `use_rslora` (alpha / sqrt(rank), not alpha / rank)."""
    try:
        config = json.loads(adapters)
    except ValueError as error:
        raise LoraError(f"{path}: its {ADAPTER_METADATA} is not readable JSON ({error}); the file is damaged") from None
    if not isinstance(config, dict):
        raise LoraError(f"{path}: its {ADAPTER_METADATA} is a {type(config).__name__}, not a map; the file is damaged")
    alphas = {}
    for key, tensor in state_dict.items():
        match = DIFFUSERS_KEY.match(key)
        if match is None or match["peft"] != "A" or f"{match['component']}.lora_alpha" not in config:
            continue
        component, module = match["component"], match["module"]
        if config.get(f"{component}.use_dora"):
            raise LoraError(f"{path}: a DoRA file (use_dora in its metadata), which is not supported")
        patterns = config.get(f"{component}.alpha_pattern") or {}
        if not isinstance(patterns, dict):
            raise LoraError(f"{path}: its {component}.alpha_pattern is not a map of module names to alphas")
        chosen = next((name for name in patterns if module == name or module.endswith(f".{name}")), None)
        try:
            alpha = float(config[f"{component}.lora_alpha"] if chosen is None else patterns[chosen])
        except (TypeError, ValueError):
            raise LoraError(f"{path}: an alpha in its {ADAPTER_METADATA} is not a number; the file is damaged") from None
        if config.get(f"{component}.use_rslora"):
            alpha *= math.sqrt(tensor.shape[0])  # scale alpha / sqrt(r) as kohya's alpha / r
        prefix = key[:match.start("module")]
        alphas[f"{prefix}{module}.alpha"] = torch.tensor(alpha)
    return alphas


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
    if any(DIFFUSERS_UNET_MODULE.match(name) for name in unknown):
        return " (diffusers names of layers this UNet does not have, such as an LCM's guidance embedding)"
    return ""


def lora_updates(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> dict[str, LoraUpdate]:
    """Kohya module name, in the UNet's own block names -> update, for a LoRA state dict in any supported naming."""
    kohya = kohya_state_dict(state_dict, len(text_encoders(model)))
    layout = UNetLayout.from_unet(model.model.diffusion_model)
    return {ldm_module_name(name, layout): update for name, update in group_lora_state_dict(kohya).items()}


def fitted_updates(model: nn.Module,
                   state_dict: Mapping[str, torch.Tensor]) -> list[tuple[str, LoraTarget, LoraUpdate]]:
    """Each module of a LoRA state dict with the weight of `model` it changes; LoraError unless every module exists
    and fits. Only names and shapes are looked at, so `model` may hold its parameters on the meta device."""
    updates = lora_updates(model, state_dict)
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
    fitted = fitted_updates(model, lora_state_dict(lora))
    check_finite(fitted)
    return len(fitted)


def check_finite(fitted: list[tuple[str, LoraTarget, LoraUpdate]]) -> None:
    """LoraError naming the first module whose lora_down or lora_up holds NaN or an infinity."""
    for name, _, update in fitted:
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
    fitted = fitted_updates(model, lora_state_dict(lora))
    check_finite(fitted)
    text_multiplier = multiplier if text_encoder_multiplier is None else text_encoder_multiplier
    deltas = [(target, update.delta(target.weight.shape),
               multiplier if name.startswith(UNET_PREFIX) else text_multiplier) for name, target, update in fitted]
    if not all(torch.isfinite(delta).all() for _, delta, _ in deltas):
        raise LoraError("the LoRA's changes to the weights hold NaN or infinite values (its weights are damaged or "
                        "too large): nothing was changed")
    for target, delta, scale in deltas:
        weight = target.weight
        weight.copy_((weight.float() + scale * delta.to(weight.device)).to(weight.dtype))
    return len(deltas)
