"""Files that replace one part of a model's weights: `--vae` (the autoencoder) and `--unet` (the denoising UNet).

A part comes as a file in the released key layout (with its prefix, `first_stage_model.` / `model.diffusion_model.`,
or without), as a file in diffusers' names (madebyollin's sdxl-vae-fp16-fix, SDXL-Lightning's and Hyper-SD's
`*_unet.safetensors`), as a diffusers component folder (`config.json` + `diffusion_pytorch_model.*`) or as a whole
diffusers model folder (its `vae/` or `unet/`). Whatever the form, the part's weights replace the model's under the
released keys; the strict loader then checks that they fit.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Mapping

import torch

from ldm.checkpoints import CheckpointError
from ldm.diffusers_folder import FolderError, read_file_or_folder
from ldm.diffusers_names import UNetLayout, unet_state_dict, vae_state_dict

Weights = dict[str, torch.Tensor]


class PartError(Exception):
    """A part file that cannot replace the model's; the message names the flag and says why."""


@dataclass(frozen=True)
class Part:
    """One replaceable part: its `flag`, its prefix in the released keys, its diffusers component folder, the name
    its weights start with in diffusers' layout, a key prefix (after the part's prefix) every such part has, and the
    translation from diffusers' names."""

    flag: str
    prefix: str
    component: str
    diffusers_start: str
    required: str
    what: str
    from_diffusers: Callable[[Mapping[str, torch.Tensor]], Weights]


def _unet_from_diffusers(weights: Mapping[str, torch.Tensor]) -> Weights:
    return unet_state_dict(weights, UNetLayout.from_names(weights))


VAE_PART = Part("--vae", "first_stage_model.", "vae", "encoder.down_blocks.", "decoder.", "autoencoder",
                vae_state_dict)
UNET_PART = Part("--unet", "model.diffusion_model.", "unet", "down_blocks.", "out.", "UNet", _unet_from_diffusers)
TRAINING_ONLY = ("loss.", "model_ema.")  # an autoencoder's training loss, EMA shadows


def part_weights(path: str | os.PathLike, part: Part, shapes_only: bool = False) -> Weights:
    """The part's weights from `path`, under the released keys (with the part's prefix); PartError otherwise."""
    try:
        weights = read_file_or_folder(path, part.component, shapes_only)
    except (CheckpointError, FolderError) as error:
        raise PartError(f"{part.flag}: {error}") from None
    if any(key.startswith(part.diffusers_start) for key in weights):
        try:
            weights = part.from_diffusers(weights)
        except KeyError as error:
            raise PartError(f"{part.flag} {path}: {error.args[0]}") from None
    if any(key.startswith(part.prefix) for key in weights):  # a whole checkpoint, or the part saved with its prefix
        weights = {key: value for key, value in weights.items() if key.startswith(part.prefix)}
    weights = {(key if key.startswith(part.prefix) else part.prefix + key): value for key, value in weights.items()
               if not key.startswith(TRAINING_ONLY) and not key.startswith(tuple(part.prefix + name
                                                                                 for name in TRAINING_ONLY))}
    if not any(key.startswith(part.prefix + part.required) for key in weights):
        raise PartError(f"{part.flag} {path} holds no {part.what} weights ({part.required}*)")
    return weights


def merge_part(state_dict: Weights, path: str | os.PathLike, part: Part, shapes_only: bool = False) -> Weights:
    """`state_dict` with the part's weights replaced by those at `path`."""
    weights = part_weights(path, part, shapes_only)
    merged = {key: value for key, value in state_dict.items() if not key.startswith(part.prefix)}
    merged.update(weights)
    return merged
