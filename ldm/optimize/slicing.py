"""Attention slicing: queries attend a slice at a time, bounding the score matrix on kernels that materialise it."""
from __future__ import annotations

from torch import nn

from ldm.modules.attention import CrossAttention
from ldm.modules.diffusionmodules.model import AttnBlock
from ldm.modules.diffusionmodules.openaimodel import AttentionBlock

AUTO_SLICE = 1024  # queries per slice: the 64x64 latents of a 512x512 image attend in 4 slices


def enable_attention_slicing(model: nn.Module, slice_size: int | str | None = "auto") -> int:
    """Compute every attention of `model` (UNet and autoencoder) `slice_size` queries at a time.

    The result is the same; peak memory falls where the attention kernel materialises the [queries, keys] scores
    (MPS, older GPUs, very long sequences such as the autoencoder's mid block on large images), at some speed cost.
    "auto" is 1024 queries; None turns slicing off. Returns the number of attention layers set.
    """
    if slice_size == "auto":
        slice_size = AUTO_SLICE
    if slice_size is not None and (not isinstance(slice_size, int) or slice_size < 1):
        raise ValueError(f"attention slice size must be a positive number of queries or 'auto', got {slice_size!r}")
    count = 0
    for module in model.modules():
        if isinstance(module, (CrossAttention, AttnBlock, AttentionBlock)):
            module.attention_slice = slice_size
            count += 1
    return count


def disable_attention_slicing(model: nn.Module) -> int:
    return enable_attention_slicing(model, None)
