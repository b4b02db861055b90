"""Decoding large images in bounded memory (tiling) and batches one image at a time (slicing).

Tiled decoding runs the decoder's latent-resolution part (conv_in and the mid block with its global attention) on
the whole latent, which costs about 1/16 of one full-resolution activation, then the upsampling path tile by tile.
Two things make the tiles agree exactly with each other, so there are no seams:

- every tile is decoded with a margin (halo) of latent pixels at least as wide as the upsampling path's receptive
  field, and only its core is kept, so each kept pixel sees exactly the inputs it would see untiled;
- every GroupNorm of the upsampling path normalises all tiles with the same statistics, gathered over the whole
  image by a first pass over the tiles (that pass normalises each tile by itself, as plain tiled decoders do).

Cores overlap by `overlap` latent pixels and are blended with linear ramps there. The result differs from the
untiled decode only through those shared statistics (gathered from the first pass, not from the exact untiled
activations): a small global shift, the same everywhere, never an edge.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.diffusionmodules.model import Decoder, GroupNorm, nonlinearity


@dataclass
class VaeTiling:
    """`tile`: latent pixels per tile side (8 image pixels each); `overlap`: latent pixels shared by neighbouring
    tiles and blended; `halo`: extra latent context around each tile (None: the decoder's receptive field)."""

    tile: int = 64
    overlap: int = 8
    halo: int | None = None

    def __post_init__(self) -> None:
        if self.tile < 8 or not 0 <= self.overlap < self.tile // 2:
            raise ValueError(f"VAE tiling needs tile >= 8 latent pixels and 0 <= overlap < tile/2, got tile="
                             f"{self.tile}, overlap={self.overlap}; try tile 64 (512 image pixels) and overlap 8")
        if self.halo is not None and self.halo < 0:
            raise ValueError(f"VAE tiling halo must be >= 0 latent pixels, got {self.halo}")


def receptive_radius(decoder: Decoder) -> int:
    """Latent pixels on each side that influence an output pixel through the upsampling path (3x3 convolutions)."""
    radius, scale = 0.0, 1
    for level in reversed(range(decoder.num_resolutions)):
        radius += 2 * len(decoder.up[level].block) / scale  # two 3x3 convolutions per residual block
        if level != 0:
            scale *= 2
            radius += 1 / scale  # the convolution after upsampling
    return math.ceil(radius + 1 / scale)  # conv_out


@dataclass
class _GroupStatistics:
    """Per (image, group) sums over tile cores of one GroupNorm's input, in float64."""

    total: torch.Tensor | None = None
    squares: torch.Tensor | None = None
    count: int = 0

    def add(self, core: torch.Tensor, groups: int) -> None:
        grouped = core.reshape(core.shape[0], groups, -1)  # [B, C, h, w] -> [B, G, C/G * h * w]
        variance, mean = torch.var_mean(grouped.float(), dim=-1, correction=0)
        count = grouped.shape[-1]
        total, squares = mean.double() * count, (variance.double() + mean.double().square()) * count
        self.total = total if self.total is None else self.total + total
        self.squares = squares if self.squares is None else self.squares + squares
        self.count += count

    def mean_and_variance(self) -> tuple[torch.Tensor, torch.Tensor]:
        mean = self.total / self.count
        return mean, (self.squares / self.count - mean.square()).clamp(min=0)


@dataclass
class _TileView:
    """Where the current tile's core lies inside the decoded input region, in latent pixels; as a GroupNorm's
    `statistics`, it records the cores' statistics (`recording`) or normalises with those of the whole image."""

    top: int = 0
    left: int = 0
    height: int = 0
    width: int = 0
    region_height: int = 1
    statistics: dict = field(default_factory=dict)
    recording: bool = True

    def __call__(self, norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
        if self.recording:
            scale = x.shape[-2] // self.region_height
            core = x[..., self.top * scale:(self.top + self.height) * scale,
                     self.left * scale:(self.left + self.width) * scale]
            self.statistics.setdefault(norm, _GroupStatistics()).add(core, norm.num_groups)
            return F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
        stats = self.statistics[norm]
        mean, variance = stats if isinstance(stats, tuple) else stats.mean_and_variance()
        per_channel = x.shape[1] // norm.num_groups
        inverse_std = (variance + norm.eps).rsqrt().repeat_interleave(per_channel, dim=1)  # [B, G] -> [B, C]
        mean = mean.repeat_interleave(per_channel, dim=1)
        scale = inverse_std * (norm.weight.double() if norm.weight is not None else 1.0)
        shift = (norm.bias.double() if norm.bias is not None else 0.0) - mean * scale
        scale, shift = (t.to(x.dtype)[:, :, None, None] for t in (scale, shift))  # [B, C] -> [B, C, 1, 1]
        return torch.addcmul(shift, x, scale)


@contextmanager
def _shared_statistics(norms: list[GroupNorm], view: _TileView) -> Iterator[None]:
    previous = [norm.statistics for norm in norms]
    for norm in norms:
        norm.statistics = view
    try:
        yield
    finally:
        for norm, statistics in zip(norms, previous):
            norm.statistics = statistics


def _upsampling_path(decoder: Decoder, h: torch.Tensor) -> torch.Tensor:
    """The part of `Decoder.forward` after the mid block."""
    for level in reversed(range(decoder.num_resolutions)):
        stage = decoder.up[level]
        for block in stage.block:
            h = block(h)
        if level != 0:
            h = stage.upsample(h)
    h = decoder.conv_out(nonlinearity(decoder.norm_out(h)))
    return torch.tanh(h) if decoder.tanh_out else h


def _spans(size: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """Tiles along one axis as (start, length, owned start, owned end): tiles overlap by at least `overlap`; the
    owned parts split every overlap at its middle, so that each pixel is counted once in the statistics."""
    if size <= tile:
        return [(0, size, 0, size)]
    count = math.ceil((size - overlap) / (tile - overlap))
    stride = (size - tile) / (count - 1)
    starts = [round(index * stride) for index in range(count)]
    bounds = [0] + [(starts[index + 1] + starts[index] + tile) // 2 for index in range(count - 1)] + [size]
    return [(start, tile, bounds[index], bounds[index + 1]) for index, start in enumerate(starts)]


def _ramp(length: int, before: int, after: int, device: torch.device) -> torch.Tensor:
    """Blend weights along one axis of a tile core: rising over `before` pixels, falling over `after`."""
    weight = torch.ones(length, dtype=torch.float64, device=device)
    if before:
        weight[:before] = torch.arange(1, before + 1, dtype=torch.float64, device=device) / (before + 1)
    if after:
        weight[length - after:] = torch.arange(after, 0, -1, dtype=torch.float64, device=device) / (after + 1)
    return weight


def decode_tiled(decoder: Decoder, z: torch.Tensor, tiling: VaeTiling,
                 statistics: dict[nn.GroupNorm, tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
    """`decoder(z)` for a large latent `z` [B, C, h, w], holding only tile-sized full-resolution activations.

    `statistics`: (mean, variance) per (image, group) [B, G] for every GroupNorm of the upsampling path, used instead
    of gathering them in a first pass.
    """
    if any(len(decoder.up[level].attn) for level in range(decoder.num_resolutions)):
        raise ValueError("VAE tiling needs a decoder without attention in its upsampling path (the released SD "
                         "autoencoders have none); decode without --vae_tiling")
    if decoder.give_pre_end:
        raise ValueError("VAE tiling does not support give_pre_end=True; decode without tiling")
    height, width = z.shape[-2:]
    halo = receptive_radius(decoder) if tiling.halo is None else tiling.halo
    h = decoder.conv_in(z.contiguous(memory_format=torch.channels_last) if decoder.channels_last else z)
    h = decoder.mid.block_2(decoder.mid.attn_1(decoder.mid.block_1(h)))

    tiles = [(row, column) for row in _spans(height, tiling.tile, tiling.overlap)
             for column in _spans(width, tiling.tile, tiling.overlap)]
    norms = [module for module in [*decoder.up.modules(), decoder.norm_out] if isinstance(module, nn.GroupNorm)]
    if not all(isinstance(norm, GroupNorm) for norm in norms):
        raise ValueError("VAE tiling needs the decoder's GroupNorms to be ldm.modules.diffusionmodules.model.GroupNorm "
                         "(what Normalize builds); decode without --vae_tiling")
    view = _TileView(statistics=dict(statistics) if statistics is not None else {})
    factor = 2 ** (decoder.num_resolutions - 1)
    blend = tiling.overlap * factor
    output = weights = None
    with _shared_statistics(norms, view):
        for recording in (False,) if statistics is not None else (True, False):
            view.recording = recording
            for (top, tile_height, own_top, own_bottom), (left, tile_width, own_left, own_right) in tiles:
                region_top, region_left = max(0, top - halo), max(0, left - halo)
                region = h[..., region_top:min(height, top + tile_height + halo),
                           region_left:min(width, left + tile_width + halo)]
                view.top, view.left = own_top - region_top, own_left - region_left
                view.height, view.width = own_bottom - own_top, own_right - own_left
                view.region_height = region.shape[-2]
                layout = torch.channels_last if decoder.channels_last else torch.contiguous_format
                piece = _upsampling_path(decoder, region.contiguous(memory_format=layout))
                if recording:
                    continue
                core = piece[..., (top - region_top) * factor:(top - region_top + tile_height) * factor,
                             (left - region_left) * factor:(left - region_left + tile_width) * factor]
                if output is None:
                    output = core.new_zeros(*core.shape[:2], height * factor, width * factor, dtype=torch.float64)
                    weights = torch.zeros(height * factor, width * factor, dtype=torch.float64, device=core.device)
                weight = torch.outer(
                    _ramp(tile_height * factor, blend if top else 0, blend if top + tile_height < height else 0,
                          core.device),
                    _ramp(tile_width * factor, blend if left else 0, blend if left + tile_width < width else 0,
                          core.device))
                rows_out = slice(top * factor, (top + tile_height) * factor)
                columns_out = slice(left * factor, (left + tile_width) * factor)
                output[..., rows_out, columns_out] += core.double() * weight
                weights[rows_out, columns_out] += weight
    return (output / weights).to(z.dtype if z.is_floating_point() else torch.float32)


def enable_vae_tiling(model: nn.Module, tile: int = 64, overlap: int = 8, halo: int | None = None) -> int:
    """Decode latents larger than `tile` latent pixels (8 image pixels each) tile by tile (see this module's
    docstring). `model`: a LatentDiffusion, an autoencoder, or anything holding one. Returns the number of
    autoencoders switched."""
    tiling = VaeTiling(tile, overlap, halo)
    switched = 0
    for module in model.modules():
        if hasattr(module, "tiling") and isinstance(getattr(module, "decoder", None), Decoder):
            module.tiling = tiling
            switched += 1
    return switched


def disable_vae_tiling(model: nn.Module) -> None:
    for module in model.modules():
        if hasattr(module, "tiling") and isinstance(getattr(module, "decoder", None), Decoder):
            module.tiling = None


def enable_vae_slicing(model: nn.Module, enabled: bool = True) -> int:
    """Decode batches one image at a time: the same images, with the decoder's activations for one image at once.
    Returns the number of autoencoders switched."""
    switched = 0
    for module in model.modules():
        if hasattr(module, "decode_one_at_a_time"):
            module.decode_one_at_a_time = enabled
            switched += 1
    return switched
