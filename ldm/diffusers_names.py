"""diffusers' names for the parts of a Stable Diffusion model, translated into the released (CompVis / Stability) ones.

diffusers renames the UNet's and the autoencoder's blocks (`down_blocks.1.resnets.0.conv1` for
`input_blocks.4.0.in_layers.2`) and stores the OpenCLIP text encoders in Hugging Face CLIP's layout. The translation
here is structural: block numbers follow from how many res blocks each level has and which levels carry attention
(`UNetLayout`), so every UNet this package builds (SD 1.x/2.x, SDXL, SSD-1B, Vega) is covered without tables of
names. Used by the diffusers-folder reader and by the LoRA loader (LoRAs trained with diffusers name its modules).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch

# diffusers' names inside a res block -> the released ones
RES_BLOCK = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
             "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
UNET_TOP = {"conv_in": "input_blocks.0.0", "time_embedding.linear_1": "time_embed.0",
            "time_embedding.linear_2": "time_embed.2", "time_embedding.cond_proj": "time_cond_proj",
            "class_embedding": "label_emb",
            "add_embedding.linear_1": "label_emb.0.0",
            "add_embedding.linear_2": "label_emb.0.2", "conv_norm_out": "out.0", "conv_out": "out.2"}
VAE_RES_BLOCK = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
VAE_TOP = {"conv_norm_out": "norm_out"}
DOWN_RESNET = re.compile(r"^down_blocks\.(\d+)\.resnets\.(\d+)\.")
UP_ATTENTION = re.compile(r"^up_blocks\.(\d+)\.attentions\.")
# Hugging Face CLIP's names inside an encoder layer -> open_clip's (q/k/v are fused, see `open_clip_state_dict`)
OPEN_CLIP_LAYER = {"self_attn.out_proj": "attn.out_proj", "layer_norm1": "ln_1", "layer_norm2": "ln_2",
                   "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}


@dataclass(frozen=True)
class UNetLayout:
    """What the UNet's block numbering depends on: res blocks per level (`num_res_blocks`, top level first) and, per
    level, whether the last block of its upward path holds attention (its upsampler then comes third, not second)."""

    num_res_blocks: tuple[int, ...]
    up_attention: tuple[bool, ...]  # diffusers' order: deepest level first

    @classmethod
    def from_unet(cls, unet: Any) -> UNetLayout:
        """The layout of one of our `UNetModel`s."""
        blocks = tuple(int(count) for count in unet.num_res_blocks)
        ends = [sum(count + 1 for count in blocks[::-1][:level + 1]) - 1 for level in range(len(blocks))]
        return cls(blocks, tuple(len(unet.output_blocks[end]) > 1 and _is_attention(unet.output_blocks[end][1])
                                 for end in ends))

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> UNetLayout:
        """The layout a diffusers UNet config (`unet/config.json`) describes."""
        levels = len(config["block_out_channels"])
        per_level = config.get("layers_per_block", 2)
        blocks = tuple(per_level) if isinstance(per_level, (list, tuple)) else (int(per_level),) * levels
        up_types = config.get("up_block_types") or ()
        return cls(blocks, tuple("CrossAttn" in name for name in up_types))

    @classmethod
    def from_names(cls, names: Iterable[str]) -> UNetLayout:
        """The layout of a diffusers UNet from its weights' names alone (a UNet-only file such as SDXL-Lightning's):
        res blocks per level from `down_blocks.<level>.resnets.<n>`, attention from `up_blocks.<level>.attentions`."""
        resnets: dict[int, set[int]] = {}
        attention: set[int] = set()
        for name in names:
            down = DOWN_RESNET.match(name)
            if down:
                resnets.setdefault(int(down.group(1)), set()).add(int(down.group(2)))
            up = UP_ATTENTION.match(name)
            if up:
                attention.add(int(up.group(1)))
        if not resnets or sorted(resnets) != list(range(len(resnets))):
            raise KeyError("the weights have no down_blocks.<level>.resnets: not a diffusers UNet")
        blocks = tuple(len(resnets[level]) for level in range(len(resnets)))
        return cls(blocks, tuple(level in attention for level in range(len(blocks))))

    def input_index(self, level: int, block: int) -> int:
        """Position in `input_blocks` of res block `block` of `level` (the downsampler is block num_res_blocks)."""
        return 1 + sum(count + 1 for count in self.num_res_blocks[:level]) + block

    def output_index(self, up_level: int, block: int) -> int:
        """Position in `output_blocks` of block `block` of diffusers' up level `up_level` (deepest level first)."""
        upward = self.num_res_blocks[::-1]
        return sum(count + 1 for count in upward[:up_level]) + block


def _is_attention(module: Any) -> bool:
    return hasattr(module, "transformer_blocks")


def _split(name: str, count: int) -> tuple[list[str], str]:
    parts = name.split(".")
    return parts[:count], ".".join(parts[count:])


def _inner(rest: str, table: Mapping[str, str]) -> str:
    """`rest` with its leading module name translated by `table` (longest match first); parameter names follow."""
    for old in sorted(table, key=len, reverse=True):
        if rest == old or rest.startswith(old + "."):
            return table[old] + rest[len(old):]
    return rest


BLOCK_PARTS = {"resnets": 0, "attentions": 1}  # their positions in a block of ours: res block, then attention


def _block_part(block: str, kind: str, rest: str) -> str:
    """A res block's or attention's name inside our `block` (`input_blocks.4`): res blocks' layers renamed."""
    return f"{block}.{BLOCK_PARTS[kind]}.{_inner(rest, RES_BLOCK) if kind == 'resnets' else rest}"


def ldm_unet_name(name: str, layout: UNetLayout) -> str:
    """diffusers' dotted UNet module or parameter name as ours, under `model.diffusion_model.` (without it):
    `down_blocks.1.resnets.0.conv1.weight` -> `input_blocks.4.0.in_layers.2.weight` for two res blocks per level.
    A KeyError for names no UNet of ours has (class embeddings, LCM's guidance embedding, ...)."""
    top = _inner(name, UNET_TOP)
    if top != name:
        return top
    head, _ = _split(name, 1)
    if head == ["down_blocks"]:
        (_, level, kind, index), rest = _split(name, 4)
        level, index = int(level), int(index)
        if kind in BLOCK_PARTS:
            return _block_part(f"input_blocks.{layout.input_index(level, index)}", kind, rest)
        if kind == "downsamplers" and index == 0 and (rest == "conv" or rest.startswith("conv.")):
            return f"input_blocks.{layout.input_index(level, layout.num_res_blocks[level])}.0.op{rest[4:]}"
    elif head == ["mid_block"]:
        (_, kind, index), rest = _split(name, 3)
        if kind == "resnets":
            return f"middle_block.{2 * int(index)}.{_inner(rest, RES_BLOCK)}"
        if kind == "attentions" and index == "0":
            return _block_part("middle_block", kind, rest)
    elif head == ["up_blocks"]:
        (_, level, kind, index), rest = _split(name, 4)
        level, index = int(level), int(index)
        if kind in BLOCK_PARTS:
            return _block_part(f"output_blocks.{layout.output_index(level, index)}", kind, rest)
        if kind == "upsamplers" and index == 0:
            last = layout.num_res_blocks[::-1][level]
            position = 2 if layout.up_attention[level] else 1
            return f"output_blocks.{layout.output_index(level, last)}.{position}.{rest}"
    raise KeyError(f"{name} has no counterpart in this package's UNet")


VAE_BLOCK = re.compile(r"^(encoder|decoder)\.(down_blocks|up_blocks)\.(\d+)\."
                       r"(resnets\.\d+|downsamplers\.0|upsamplers\.0)\.(.+)$")
VAE_MIDDLE = re.compile(r"^(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)$")


CONTROLNET_HINT = re.compile(r"^controlnet_cond_embedding\.(?:(conv_in)|blocks\.(\d+)|(conv_out))\.(.+)$")
CONTROLNET_ZERO_CONV = re.compile(r"^controlnet_down_blocks\.(\d+)\.(.+)$")


def controlnet_state_dict(weights: Mapping[str, Any]) -> dict[str, Any]:
    """A diffusers `ControlNetModel`'s weights (tensors or shapes) in cldm's `ControlNet` names: its UNet half as
    `ldm_unet_name` names it, the conditioning embedding as `input_hint_block` (convolutions at the even indices,
    SiLUs between), `controlnet_down_blocks.<i>` as `zero_convs.<i>.0`, `controlnet_mid_block` as
    `middle_block_out.0`."""
    hint_blocks = len({match.group(2) for match in map(CONTROLNET_HINT.match, weights) if match and match.group(2)})
    layout = UNetLayout.from_names(weights)
    converted = {}
    for name, value in weights.items():
        hint, zero_conv = CONTROLNET_HINT.match(name), CONTROLNET_ZERO_CONV.match(name)
        if hint:
            conv_in, block, conv_out, rest = hint.groups()
            index = 0 if conv_in else 2 * (hint_blocks + 1) if conv_out else 2 * (int(block) + 1)
            converted[f"input_hint_block.{index}.{rest}"] = value
        elif zero_conv:
            converted[f"zero_convs.{zero_conv.group(1)}.0.{zero_conv.group(2)}"] = value
        elif name.startswith("controlnet_mid_block."):
            converted["middle_block_out.0." + name[len("controlnet_mid_block."):]] = value
        else:
            converted[ldm_unet_name(name, layout)] = value
    return converted


def ldm_vae_name(name: str, levels: int) -> str:
    """diffusers' autoencoder parameter name as ours, under `first_stage_model.` (without it); `levels` is the
    number of resolutions (len(block_out_channels)): the decoder's up blocks are numbered from the other end."""
    if name.startswith(("quant_conv.", "post_quant_conv.")):
        return name
    side, _, rest = name.partition(".")
    if side in ("encoder", "decoder") and rest.split(".")[0] in ("conv_in", "conv_out", "conv_norm_out"):
        return f"{side}.{_inner(rest, VAE_TOP)}"
    block = VAE_BLOCK.match(name)
    if block:
        side, kind, level, part, rest = block.groups()
        level = int(level) if kind == "down_blocks" else levels - 1 - int(level)
        group = "down" if kind == "down_blocks" else "up"
        if part.startswith("resnets"):
            return f"{side}.{group}.{level}.block.{part.split('.')[1]}.{_inner(rest, VAE_RES_BLOCK)}"
        return f"{side}.{group}.{level}.{group}sample.{rest}"
    middle = VAE_MIDDLE.match(name)
    if middle:
        side, kind, index, rest = middle.groups()
        if kind == "resnets":
            return f"{side}.mid.block_{int(index) + 1}.{_inner(rest, VAE_RES_BLOCK)}"
        if index == "0":
            return f"{side}.mid.attn_1.{_inner(rest, VAE_ATTENTION)}"
    raise KeyError(f"{name} has no counterpart in this package's autoencoder")


DIFFUSERS_VAE_LEVEL = re.compile(r"^encoder\.down_blocks\.(\d+)\.")


def vae_state_dict(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers `AutoencoderKL`'s weights in our names; the mid-block attention's linear layers become the 1x1
    convolutions ours uses (`[C, C]` -> `[C, C, 1, 1]`, a view). The number of resolutions, which numbers the
    decoder's blocks, is read from the encoder's."""
    levels = len({match.group(1) for match in map(DIFFUSERS_VAE_LEVEL.match, weights) if match})
    converted = {}
    for name, tensor in weights.items():
        ours = ldm_vae_name(name, levels)
        if ".mid.attn_1." in ours and ours.endswith(".weight") and not ours.endswith("norm.weight") \
                and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]
        converted[ours] = tensor
    return converted


def hf_text_state_dict(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Hugging Face CLIP text model's weights under `text_model.` (transformers 5 saves `CLIPTextModel` without
    that wrapper, earlier versions and `CLIPTextModelWithProjection` with it); `text_projection` stays on top."""
    return {(name if name.startswith("text_model.") or name.startswith("text_projection.") else "text_model." + name):
            tensor for name, tensor in weights.items()}


def open_clip_state_dict(weights: Mapping[str, torch.Tensor], layers: int) -> dict[str, torch.Tensor]:
    """A Hugging Face `CLIPTextModel(WithProjection)` in open_clip's names (`OpenCLIPTextTransformer`): separate
    q/k/v projections fused into `attn.in_proj_*` (q, k, v rows in that order), `text_projection.weight` kept under
    that name for `normalise_text_layout` to transpose. `layers`: the encoder layers to read."""
    text, weights = "text_model.", hf_text_state_dict(weights)
    converted = {"token_embedding.weight": weights[text + "embeddings.token_embedding.weight"],
                 "positional_embedding": weights[text + "embeddings.position_embedding.weight"],
                 "ln_final.weight": weights[text + "final_layer_norm.weight"],
                 "ln_final.bias": weights[text + "final_layer_norm.bias"]}
    if "text_projection.weight" in weights:
        converted["text_projection.weight"] = weights["text_projection.weight"]
    for index in range(layers):
        layer, block = f"{text}encoder.layers.{index}.", f"transformer.resblocks.{index}."
        for part in ("weight", "bias"):
            converted[block + "attn.in_proj_" + part] = torch.cat(
                [weights[f"{layer}self_attn.{name}_proj.{part}"] for name in ("q", "k", "v")])
            for hf_name, name in OPEN_CLIP_LAYER.items():
                converted[f"{block}{name}.{part}"] = weights[f"{layer}{hf_name}.{part}"]
    return converted


def prefixed(weights: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {prefix + name: tensor for name, tensor in weights.items()}


def unet_state_dict(weights: Mapping[str, torch.Tensor], layout: UNetLayout) -> dict[str, torch.Tensor]:
    """A diffusers `UNet2DConditionModel`'s weights in our names (see `ldm_unet_name`)."""
    return {ldm_unet_name(name, layout): tensor for name, tensor in weights.items()}
