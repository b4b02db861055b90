"""The exact GroupNorm statistics of an untiled decode, which tiled decodes are checked against."""
from __future__ import annotations

import torch
from torch import nn


def exact_statistics(vae: nn.Module, z: torch.Tensor) -> dict:
    """(mean, variance) per image and group of every upsampling-path GroupNorm's input, from an untiled decode."""
    decoder = vae.decoder
    norms = [m for m in [*decoder.up.modules(), decoder.norm_out] if isinstance(m, nn.GroupNorm)]
    statistics = {}

    def record(norm, args):
        grouped = args[0].double().reshape(args[0].shape[0], norm.num_groups, -1)
        statistics[norm] = (grouped.mean(-1), grouped.var(-1, correction=0))

    hooks = [norm.register_forward_pre_hook(record) for norm in norms]
    with torch.no_grad():
        vae.decode(z)
    for hook in hooks:
        hook.remove()
    return statistics
