"""What a checkpoint's keys say about its model, before any weight is read: its family (SD 1.x, 2.x, inpainting, the
x4 upscaler, SDXL base or refiner) and every width and depth of its UNet, text encoders and autoencoder, as overrides
of a released config (`params_from_shapes`); and the two OpenCLIP layouts in circulation made one
(`normalise_text_layout`). Values are tensors or shapes: only their shapes are looked at.
"""
from __future__ import annotations

import math
import re
from typing import Any, Mapping

import torch

UNET, VAE, TEXT = "model.diffusion_model.", "first_stage_model.", "cond_stage_model."
XL_TEXT = "conditioner.embedders."
TEXT_TO_IMAGE_CHANNELS, INPAINTING_CHANNELS = 4, 9  # inpainting UNets also take the mask (1) and masked image (4)
UPSCALER_CHANNELS = 7  # the x4 upscaler's UNet also takes the low-resolution RGB image (3)
LOW_SCALE = "low_scale_model."  # the x4 upscaler's noise augmentation: schedule buffers only

class LoadError(Exception):
    """A checkpoint/config problem a user can fix; the message is one line that says how."""


def detect_family(shapes: Mapping[str, tuple[int, ...]]) -> str:
    """"v1", "v2", "v1-inpainting", "v2-inpainting", "x4-upscaler", "xl-base" (also SDXL turbo) or "xl-refiner"; a
    LoadError for
    checkpoints this package cannot run (depth models, SDXL inpainting, ControlNets, non-SD files)."""
    if any(key.startswith("control_model.") for key in shapes):  # ControlNet 1.0 files also hold the base model
        raise LoadError("this file is a ControlNet (control_model.* weights): pass it with --controlnet, and an SD "
                        "checkpoint with --ckpt")
    if not any(key.startswith(UNET) for key in shapes):
        if any(key.startswith(("encoder.", "decoder.", VAE)) for key in shapes):
            raise LoadError("this file holds only an autoencoder (VAE): pass it with --vae next to a full checkpoint")
        if any("lora" in key for key in shapes):
            raise LoadError("this file is a LoRA, not a full Stable Diffusion checkpoint")
        if any(key.startswith(("unet.", "down_blocks.", "text_encoder.")) for key in shapes):
            raise LoadError("this file is in diffusers' layout, which is not supported: use the single-file "
                            "checkpoint (CompVis / Stability layout, e.g. sd_xl_base_1.0.safetensors)")
        raise LoadError("this file is not a Stable Diffusion checkpoint (it has no model.diffusion_model.* weights)")
    first_conv = shapes.get(UNET + "input_blocks.0.0.weight")
    channels = TEXT_TO_IMAGE_CHANNELS if first_conv is None else first_conv[1]
    if channels == UPSCALER_CHANNELS and (UNET + "label_emb.weight" in shapes
                                          or any(key.startswith(LOW_SCALE) for key in shapes)):
        return "x4-upscaler"  # its noise level is the UNet's class label
    if channels not in (TEXT_TO_IMAGE_CHANNELS, INPAINTING_CHANNELS):
        raise LoadError(f"this UNet takes {channels} input channels (a depth or other image-conditioned model), which "
                        "is not supported: use a text-to-image (4-channel) or inpainting (9-channel) checkpoint")
    if any(key.startswith(XL_TEXT) for key in shapes):
        if channels == INPAINTING_CHANNELS:
            raise LoadError("this SDXL UNet takes 9 input channels (SDXL inpainting), which is not supported: use an "
                            "SD 1.x/2.x inpainting checkpoint, or the SDXL base with scripts/inpaint.py")
        return _sdxl_family(shapes)
    suffix = "-inpainting" if channels == INPAINTING_CHANNELS else ""
    if any(key.startswith(TEXT + "model.") for key in shapes):
        return "v2" + suffix
    if any(key.startswith(TEXT + "transformer.") for key in shapes):
        return "v1" + suffix
    raise LoadError("cannot tell the model family: the checkpoint has no text encoder weights (cond_stage_model.*)")


def _sdxl_family(shapes: Mapping[str, tuple[int, ...]]) -> str:
    """The base (and turbo) has CLIP ViT-L then OpenCLIP bigG as embedders 0 and 1; the refiner only bigG, as 0."""
    def has(prefix: str) -> bool:
        return any(key.startswith(XL_TEXT + prefix) for key in shapes)

    if has("0.transformer.") and has("1.model."):
        return "xl-base"
    if has("0.model.") and not has("1."):
        return "xl-refiner"
    found = sorted({".".join(key.split(".")[:4]) for key in shapes if key.startswith(XL_TEXT)})
    raise LoadError(f"this SDXL-style checkpoint has text encoders {', '.join(found)}, which match neither SDXL base "
                    "(conditioner.embedders.0.transformer + 1.model) nor the refiner (0.model alone): pass its own "
                    "--config")


OPEN_CLIP = re.compile(r"^((?:conditioner\.embedders\.\d+|cond_stage_model)\.model\.)"
                       r"(text_projection\.weight|text_projection)$")
INITIAL_LOGIT_SCALE = math.log(1 / 0.07)  # OpenCLIP's initial temperature


def normalise_text_layout(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """SDXL files written by diffusers' conversion script (Segmind's SSD-1B and Vega, many fine-tunes), in the layout
    generative-models writes. Their OpenCLIP `text_projection.weight` is a linear layer's weight [embed_dim, width]:
    it becomes OpenCLIP's `text_projection` [width, embed_dim]. Their missing `logit_scale` (the temperature of
    contrastive training, which inference does not use) is OpenCLIP's initial value (also for SD 2.x models read from
    diffusers folders, which do not keep it). Values are tensors or shapes."""
    prefixes = {match.group(1): match.group(2) for match in map(OPEN_CLIP.match, state_dict) if match}
    if not prefixes:
        return dict(state_dict)
    normalised = dict(state_dict)
    for prefix, name in prefixes.items():
        if name == "text_projection.weight" and prefix + "text_projection" not in normalised:
            value = normalised.pop(prefix + name)
            normalised[prefix + "text_projection"] = (tuple(reversed(value)) if isinstance(value, tuple)
                                                      else value.t().contiguous())
        if prefix + "logit_scale" not in normalised:
            reference = normalised[prefix + "text_projection"]
            normalised[prefix + "logit_scale"] = (() if isinstance(reference, tuple) else torch.tensor(
                INITIAL_LOGIT_SCALE, dtype=reference.dtype, device=reference.device))
    return normalised


def _numbered(shapes: Mapping[str, Any], prefix: str) -> int:
    """How many numbered children `prefix<N>.` the keys have (one more than the highest N; 0 for none)."""
    numbers = {int(head) for head in (key[len(prefix):].split(".", 1)[0] for key in shapes if key.startswith(prefix))
               if head.isdigit()}
    return max(numbers) + 1 if numbers else 0


def _shape(shapes: Mapping[str, tuple[int, ...]], key: str) -> tuple[int, ...]:
    if key not in shapes:
        raise LoadError(f"cannot read the model's structure from the checkpoint: it has no {key}; pass its --config")
    return tuple(shapes[key])


def unet_params_from_shapes(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """The UNet's structure and widths, read from its `model.diffusion_model.*` keys, as keyword arguments of
    `UNetModel`: levels, widths, res blocks per level, the transformer depth of every block (0 where a block has
    no attention, as SSD-1B and Segmind Vega remove some), the middle block's (0: a single res block), the context
    and vector widths. Head widths cannot be read from weights and are left to the config."""
    first = _shape(shapes, UNET + "input_blocks.0.0.weight")
    model_channels = first[0]
    channel_mult, num_res_blocks, input_depths = [], [0], []
    for index in range(1, _numbered(shapes, UNET + "input_blocks.")):
        block = f"{UNET}input_blocks.{index}."
        if block + "0.op.weight" in shapes:  # a downsampling step ends the level
            num_res_blocks.append(0)
            continue
        width = _shape(shapes, block + "0.out_layers.3.weight")[0]
        if num_res_blocks[-1] == 0:
            if width % model_channels:
                raise LoadError(f"the UNet's width {width} at level {len(channel_mult)} is not a multiple of its "
                                f"first width {model_channels}: pass its --config")
            channel_mult.append(width // model_channels)
        num_res_blocks[-1] += 1
        input_depths.append(_numbered(shapes, block + "1.transformer_blocks."))
    output_depths = [_numbered(shapes, f"{UNET}output_blocks.{index}.1.transformer_blocks.")
                     for index in range(_numbered(shapes, UNET + "output_blocks."))]
    if 0 in num_res_blocks or len(output_depths) != sum(blocks + 1 for blocks in num_res_blocks):
        raise LoadError(f"the UNet's blocks ({len(input_depths)} input res blocks over levels {num_res_blocks}, "
                        f"{len(output_depths)} output blocks) are not a UNet this package builds: pass its --config")
    starts = [sum(num_res_blocks[:level]) for level in range(len(num_res_blocks))]
    params: dict[str, Any] = dict(
        in_channels=first[1], out_channels=_shape(shapes, UNET + "out.2.weight")[0], model_channels=model_channels,
        channel_mult=channel_mult, num_res_blocks=num_res_blocks,
        transformer_depth=[max(input_depths[start:start + blocks]) for start, blocks in zip(starts, num_res_blocks)],
        transformer_depth_input=input_depths, transformer_depth_output=output_depths,
        transformer_depth_middle=_numbered(shapes, UNET + "middle_block.1.transformer_blocks."))
    cross = sorted(key for key in shapes if key.startswith(UNET) and key.endswith(".attn2.to_k.weight"))
    if cross:
        params["context_dim"] = shapes[cross[0]][1]
        params["use_linear_in_transformer"] = len(shapes[cross[0].replace(
            "transformer_blocks.0.attn2.to_k.weight", "proj_in.weight")]) == 2
    if UNET + "label_emb.0.0.weight" in shapes:
        params["adm_in_channels"] = shapes[UNET + "label_emb.0.0.weight"][1]
    if UNET + "time_cond_proj.weight" in shapes:  # a latent consistency model's guidance embedding
        params["time_cond_proj_dim"] = shapes[UNET + "time_cond_proj.weight"][1]
    return params


# The size (and score) embedders of SDXL's conditioner: their indices and how many numbers they embed in all.
SIZE_EMBEDDERS = {"xl-base": ((2, 3, 4), 6), "xl-refiner": ((1, 2, 3), 5)}
HEAD_WIDTH = 64  # CLIP ViT-L, OpenCLIP ViT-H and bigG all use 64-wide attention heads


def _text_params(shapes: Mapping[str, tuple[int, ...]], prefix: str, params: str) -> dict[str, Any]:
    """Overrides for the text encoder whose weights are under `prefix` (a CLIP `transformer.` or an OpenCLIP
    `model.` tower), as parameters under `params`: width, layers, vocabulary and projection; heads of 64 channels
    (every released tower), and for CLIP in SDXL's place the hidden layer before the last."""
    clip, open_clip = prefix + "transformer.text_model.", prefix + "model."
    if clip + "embeddings.token_embedding.weight" in shapes:
        vocab_size, width = _shape(shapes, clip + "embeddings.token_embedding.weight")
        layers = _numbered(shapes, clip + "encoder.layers.")
        overrides = {params + "vocab_size": vocab_size, params + "width": width, params + "layers": layers,
                     params + "heads": max(1, width // HEAD_WIDTH)}
        if prefix.startswith(XL_TEXT):
            overrides[params + "layer_idx"] = layers - 1
        return overrides
    if open_clip + "token_embedding.weight" in shapes:
        vocab_size, width = _shape(shapes, open_clip + "token_embedding.weight")
        return {params + "vocab_size": vocab_size, params + "width": width,
                params + "layers": _numbered(shapes, open_clip + "transformer.resblocks."),
                params + "heads": max(1, width // HEAD_WIDTH),
                params + "embed_dim": _shape(shapes, open_clip + "text_projection")[1]}
    return {}


def _vae_params(shapes: Mapping[str, tuple[int, ...]], root: str) -> dict[str, Any]:
    if VAE + "encoder.conv_in.weight" not in shapes:
        return {}
    ch = _shape(shapes, VAE + "encoder.conv_in.weight")[0]
    levels = _numbered(shapes, VAE + "encoder.down.")
    ddconfig = f"{root}first_stage_config.params.ddconfig."
    return {ddconfig + "ch": ch,
            ddconfig + "ch_mult": [_shape(shapes, f"{VAE}encoder.down.{level}.block.0.conv2.weight")[0] // ch
                                   for level in range(levels)],
            ddconfig + "num_res_blocks": _numbered(shapes, VAE + "encoder.down.0.block."),
            ddconfig + "z_channels": _shape(shapes, VAE + "decoder.conv_in.weight")[1],
            f"{root}first_stage_config.params.embed_dim": _shape(shapes, VAE + "post_quant_conv.weight")[1]}


def params_from_shapes(shapes: Mapping[str, tuple[int, ...]], family: str) -> dict[str, Any]:
    """Overrides of a family's released config (dotted paths under `model.params`) that give it the checkpoint's
    UNet structure and every width: the UNet's (`unet_params_from_shapes`), the text encoders' (`_text_params`), for
    SDXL the size embedders' (what the UNet's vector input leaves after the pooled text) and the autoencoder's."""
    root = "model.params."
    xl = family.startswith("xl")
    overrides = {f"{root}{'network_config' if xl else 'unet_config'}.params.{name}": value
                 for name, value in unet_params_from_shapes(shapes).items()}
    overrides.update(_vae_params(shapes, root))
    if not xl:
        overrides.update(_text_params(shapes, TEXT, f"{root}cond_stage_config.params."))
        return overrides
    for index in range(_numbered(shapes, XL_TEXT)):
        overrides.update(_text_params(shapes, f"{XL_TEXT}{index}.",
                                      f"{root}conditioner_config.params.emb_models.{index}.params."))
    pooled = sum(value for key, value in overrides.items() if key.endswith(".embed_dim") and "emb_models" in key)
    indices, numbers = SIZE_EMBEDDERS[family]
    adm_in_channels = overrides.get(f"{root}network_config.params.adm_in_channels")
    if adm_in_channels is not None and pooled and (adm_in_channels - pooled) % numbers == 0:
        for index in indices:
            overrides[f"{root}conditioner_config.params.emb_models.{index}.params.outdim"] = \
                (adm_in_channels - pooled) // numbers
    return overrides
