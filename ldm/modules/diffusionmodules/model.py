"""Convolutional encoder and decoder of the KL autoencoder (the SD "VAE"), in the CompVis key layout.

Attribute names and list indices reproduce the released checkpoints' `first_stage_model.*` keys, so the weights
load without renaming: `encoder.down.N.block.M`, `encoder.mid.attn_1`, `decoder.up.N.block.M`, ...
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.attention import attention, linear, stacked_weight

# "vanilla-xformers" is what the SD 2.x code calls the same attention when xformers is installed; its weights are
# identical, and scaled_dot_product_attention already picks a memory-efficient kernel where one exists.
SUPPORTED_ATTN_TYPES = ("vanilla", "vanilla-xformers")


def nonlinearity(x: torch.Tensor) -> torch.Tensor:
    """Swish / SiLU, the only activation of the autoencoder."""
    return F.silu(x)


def nonlinearity_(x: torch.Tensor) -> torch.Tensor:
    """`nonlinearity` in place, for fresh tensors nothing else refers to."""
    return F.silu(x, inplace=True)


class GroupNorm(nn.GroupNorm):
    """`nn.GroupNorm` whose statistics may come from elsewhere: with `statistics` set (a callable `(norm, x) -> y`,
    as tiled decoding in ldm.optimize.vae sets it, so every tile is normalised alike), forward hands its input to
    it; with None, as built, it is nn.GroupNorm."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True):
        super().__init__(num_groups, num_channels, eps=eps, affine=affine)
        self.statistics: Callable[[nn.GroupNorm, torch.Tensor], torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.statistics is not None:
            return self.statistics(self, x)
        return super().forward(x)


def Normalize(in_channels: int, num_groups: int = 32) -> GroupNorm:
    """GroupNorm with the autoencoder's eps of 1e-6 (not torch's default 1e-5)."""
    return GroupNorm(num_groups=num_groups, num_channels=in_channels, eps=1e-6, affine=True)


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 convolution (`conv`) when `with_conv`."""

    def __init__(self, in_channels: int, with_conv: bool = True):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.with_conv else x


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3x3 convolution (`conv`), or average pooling without `with_conv`."""

    def __init__(self, in_channels: int, with_conv: bool = True):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.with_conv:
            return F.avg_pool2d(x, kernel_size=2, stride=2)
        # the released weights were trained with zero padding on the right and bottom only, which Conv2d's
        # symmetric `padding` cannot express
        x = F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0)
        return self.conv(x)


class ResnetBlock(nn.Module):
    """Pre-activation residual block; `temb_proj` exists only when `temb_channels > 0` (never in the autoencoder)."""

    def __init__(self, *, in_channels: int, out_channels: int | None = None, conv_shortcut: bool = False,
                 dropout: float = 0.0, temb_channels: int = 512):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.use_conv_shortcut = conv_shortcut

        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if temb_channels > 0:
            self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            if conv_shortcut:
                self.conv_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
            else:
                self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        # norm and convolution outputs are fresh tensors autograd does not keep: activate and add in place
        h = self.conv1(nonlinearity_(self.norm1(x)))
        if temb is not None:
            if not hasattr(self, "temb_proj"):
                raise ValueError("this ResnetBlock was built with temb_channels=0; call it with temb=None")
            h = h + self.temb_proj(nonlinearity(temb))[:, :, None, None]  # (b, c) -> (b, c, 1, 1)
        h = self.conv2(self.dropout(nonlinearity_(self.norm2(h))))

        if self.in_channels != self.out_channels:
            x = self.conv_shortcut(x) if self.use_conv_shortcut else self.nin_shortcut(x)
        return h.add_(x)


class AttnBlock(nn.Module):
    """Single-head self-attention over all pixels, with 1x1-convolution projections `q`, `k`, `v`, `proj_out`.

    `attention_slice` (None: off) bounds how many pixels attend at once; see ldm.modules.attention.attention.
    """

    def __init__(self, in_channels: int):
        super().__init__()
        self.in_channels = in_channels
        self.attention_slice: int | None = None
        self.norm = Normalize(in_channels)
        self.q = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.k = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.v = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        b, c, height, width = h.shape
        if h.is_contiguous(memory_format=torch.channels_last):
            # channels-last pixels already are tokens (b, h*w, c); the 1x1 convolutions are matrix products on them
            tokens = h.permute(0, 2, 3, 1).reshape(b, 1, height * width, c)
            weight = stacked_weight(self.q.weight, self.k.weight, self.v.weight)
            bias = stacked_weight(self.q.bias, self.k.bias, self.v.bias)
            if weight is not None and bias is not None:
                q, k, v = linear(tokens, weight.flatten(1), bias).chunk(3, dim=-1)
            else:
                q, k, v = (linear(tokens, conv.weight.flatten(1), conv.bias) for conv in (self.q, self.k, self.v))
            h = linear(attention(q, k, v, self.attention_slice), self.proj_out.weight.flatten(1), self.proj_out.bias)
            return h.view(b, height, width, c).permute(0, 3, 1, 2).add_(x)  # (b, 1, h*w, c) -> (b, c, h, w)
        q, k, v = self.q(h), self.k(h), self.v(h)
        # (b, c, h, w) -> (b, 1, h*w, c): one head whose tokens are the pixels; SDPA's default scale is c**-0.5
        q, k, v = (t.reshape(b, 1, c, height * width).transpose(2, 3) for t in (q, k, v))
        h = attention(q, k, v, self.attention_slice)
        # (b, 1, h*w, c) -> (b, c, h, w)
        h = h.transpose(2, 3).reshape(b, c, height, width)
        return x + self.proj_out(h)


def check_attn_type(attn_type: str, use_linear_attn: bool = False) -> None:
    """Reject attention kinds whose weights this package cannot run, before any layer is built."""
    if use_linear_attn:
        raise ValueError("use_linear_attn=True selects linear attention, which no released Stable Diffusion "
                         "autoencoder uses and this package does not implement; set it to false")
    if attn_type not in SUPPORTED_ATTN_TYPES:
        raise ValueError(f"attn_type {attn_type!r} is not supported; use one of {SUPPORTED_ATTN_TYPES} "
                         "(the only kinds released Stable Diffusion autoencoders use)")


def make_attn(in_channels: int, attn_type: str = "vanilla") -> AttnBlock:
    """The attention block for `attn_type`; every supported kind is the same single-head `AttnBlock`."""
    check_attn_type(attn_type)
    return AttnBlock(in_channels)


class Encoder(nn.Module):
    """Image (b, in_channels, H, W) -> moments (b, 2*z_channels or z_channels, H/f, W/f), f = 2**(len(ch_mult)-1).

    Takes the whole shared `ddconfig`, so the decoder-only options (`out_ch`, `give_pre_end`, `tanh_out`) are
    accepted and unused here.
    """

    def __init__(self, *, ch: int, out_ch: int, ch_mult: Sequence[int] = (1, 2, 4, 8), num_res_blocks: int,
                 attn_resolutions: Sequence[int], dropout: float = 0.0, resamp_with_conv: bool = True,
                 in_channels: int, resolution: int, z_channels: int, double_z: bool = True,
                 give_pre_end: bool = False, tanh_out: bool = False, use_linear_attn: bool = False,
                 attn_type: str = "vanilla"):
        super().__init__()
        check_attn_type(attn_type, use_linear_attn)
        self.ch = ch
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution = resolution
        self.in_channels = in_channels
        self.channels_last = False  # activations in channels-last layout (ldm.optimize.channels_last)

        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)

        current_resolution = resolution
        in_ch_mult = (1, *ch_mult)
        self.down = nn.ModuleList()
        for level in range(self.num_resolutions):
            block_in = ch * in_ch_mult[level]
            block_out = ch * ch_mult[level]
            stage = nn.Module()
            stage.block = nn.ModuleList()
            stage.attn = nn.ModuleList()
            for _ in range(num_res_blocks):
                stage.block.append(ResnetBlock(in_channels=block_in, out_channels=block_out, temb_channels=0,
                                               dropout=dropout))
                block_in = block_out
                if current_resolution in attn_resolutions:
                    stage.attn.append(make_attn(block_in, attn_type))
            if level != self.num_resolutions - 1:
                stage.downsample = Downsample(block_in, resamp_with_conv)
                current_resolution //= 2
            self.down.append(stage)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(in_channels=block_in, out_channels=block_in, temb_channels=0, dropout=dropout)
        self.mid.attn_1 = make_attn(block_in, attn_type)
        self.mid.block_2 = ResnetBlock(in_channels=block_in, out_channels=block_in, temb_channels=0, dropout=dropout)

        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels,
                                  kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x.contiguous(memory_format=torch.channels_last) if self.channels_last else x)
        for level, stage in enumerate(self.down):
            for index, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn) > 0:
                    h = stage.attn[index](h)
            if level != self.num_resolutions - 1:
                h = stage.downsample(h)

        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(nonlinearity_(self.norm_out(h))).contiguous()


class Decoder(nn.Module):
    """Latent (b, z_channels, h, w) -> image (b, out_ch, h*f, w*f), f = 2**(len(ch_mult)-1).

    `up[level]` holds the stage that works at `ch * ch_mult[level]` channels, so the stages run from the last
    index to the first (the released key order). Encoder-only options (`double_z`) are accepted and unused.
    """

    def __init__(self, *, ch: int, out_ch: int, ch_mult: Sequence[int] = (1, 2, 4, 8), num_res_blocks: int,
                 attn_resolutions: Sequence[int], dropout: float = 0.0, resamp_with_conv: bool = True,
                 in_channels: int, resolution: int, z_channels: int, double_z: bool = True,
                 give_pre_end: bool = False, tanh_out: bool = False, use_linear_attn: bool = False,
                 attn_type: str = "vanilla"):
        super().__init__()
        check_attn_type(attn_type, use_linear_attn)
        self.ch = ch
        self.num_resolutions = len(ch_mult)
        self.num_res_blocks = num_res_blocks
        self.resolution = resolution
        self.in_channels = in_channels
        self.give_pre_end = give_pre_end
        self.tanh_out = tanh_out
        self.channels_last = False  # activations in channels-last layout (ldm.optimize.channels_last)

        block_in = ch * ch_mult[-1]
        current_resolution = resolution // 2 ** (self.num_resolutions - 1)
        self.z_shape = (1, z_channels, current_resolution, current_resolution)

        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)

        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(in_channels=block_in, out_channels=block_in, temb_channels=0, dropout=dropout)
        self.mid.attn_1 = make_attn(block_in, attn_type)
        self.mid.block_2 = ResnetBlock(in_channels=block_in, out_channels=block_in, temb_channels=0, dropout=dropout)

        stages_deepest_first = []
        for level in reversed(range(self.num_resolutions)):
            block_out = ch * ch_mult[level]
            stage = nn.Module()
            stage.block = nn.ModuleList()
            stage.attn = nn.ModuleList()
            for _ in range(num_res_blocks + 1):
                stage.block.append(ResnetBlock(in_channels=block_in, out_channels=block_out, temb_channels=0,
                                               dropout=dropout))
                block_in = block_out
                if current_resolution in attn_resolutions:
                    stage.attn.append(make_attn(block_in, attn_type))
            if level != 0:
                stage.upsample = Upsample(block_in, resamp_with_conv)
                current_resolution *= 2
            stages_deepest_first.append(stage)
        self.up = nn.ModuleList(reversed(stages_deepest_first))

        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z.contiguous(memory_format=torch.channels_last) if self.channels_last else z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))

        for level in reversed(range(self.num_resolutions)):
            stage = self.up[level]
            for index, block in enumerate(stage.block):
                h = block(h)
                if len(stage.attn) > 0:
                    h = stage.attn[index](h)
            if level != 0:
                h = stage.upsample(h)

        if self.give_pre_end:
            return h
        h = self.conv_out(nonlinearity_(self.norm_out(h))).contiguous()
        return torch.tanh(h) if self.tanh_out else h
