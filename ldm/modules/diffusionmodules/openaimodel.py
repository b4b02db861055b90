"""The latent-diffusion UNet (Ho et al. 2020; Dhariwal & Nichol 2021; Rombach et al. 2022).

One class covers SD 1.x, SD 2.x and SDXL-style configs. Module names and `nn.Sequential` indices reproduce the
released checkpoints' keys (`input_blocks.N.M`, `middle_block.K`, `output_blocks.N.M`, `out.2`, ...), and the
constructor takes the keyword arguments of the original yaml `unet_config.params`.
"""
from __future__ import annotations

from typing import Callable, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.attention import Context, SpatialTransformer, attention
from ldm.modules.diffusionmodules.util import (
    avg_pool_nd,
    conv_nd,
    linear,
    normalization,
    timestep_embedding,
    zero_module,
)


class TimestepBlock(nn.Module):
    """A module whose forward takes the timestep embedding as a second argument."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class TimestepEmbedSequential(nn.Sequential):
    """A Sequential that hands the timestep embedding and the context to the children that take them."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: Context = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, TimestepBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class Upsample(nn.Module):
    """2x nearest-neighbour upsampling, optionally followed by a 3x3 convolution (key `conv`).

    For dims=3 only the inner two (spatial) dimensions are upsampled.
    """

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None, padding: int = 1):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        self.dims = dims
        self.use_conv = use_conv
        if use_conv:
            self.conv = conv_nd(dims, channels, self.out_channels, 3, padding=padding)
        elif self.out_channels != channels:
            raise ValueError(f"Upsample without a convolution cannot change channels {channels} -> {out_channels}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dims == 3:
            x = F.interpolate(x, (x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample(nn.Module):
    """2x downsampling by a strided 3x3 convolution or by average pooling (key `op` either way).

    For dims=3 only the inner two (spatial) dimensions are downsampled.
    """

    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None, padding: int = 1):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels or channels
        stride = (1, 2, 2) if dims == 3 else 2
        if use_conv:
            self.op = conv_nd(dims, channels, self.out_channels, 3, stride=stride, padding=padding)
        elif self.out_channels != channels:
            raise ValueError(f"Downsample without a convolution cannot change channels {channels} -> {out_channels}")
        else:
            self.op = avg_pool_nd(dims, kernel_size=stride, stride=stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ResBlock(TimestepBlock):
    """Residual block conditioned on the timestep embedding, optionally changing channels or resolution.

    `use_scale_shift_norm` applies the embedding FiLM-style (scale and shift after the second norm) instead of
    adding it; `up`/`down` resample inside the block (resblock_updown configs).
    """

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_conv: bool = False,
        use_scale_shift_norm: bool = False,
        dims: int = 2,
        up: bool = False,
        down: bool = False,
    ):
        super().__init__()
        self.out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            normalization(channels),
            nn.SiLU(),
            conv_nd(dims, channels, self.out_channels, 3, padding=1),
        )
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False, dims), Upsample(channels, False, dims)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False, dims), Downsample(channels, False, dims)
        else:
            self.h_upd = self.x_upd = nn.Identity()
        self.emb_layers = nn.Sequential(
            nn.SiLU(),
            linear(emb_channels, 2 * self.out_channels if use_scale_shift_norm else self.out_channels),
        )
        self.out_layers = nn.Sequential(
            normalization(self.out_channels),
            nn.SiLU(),
            nn.Dropout(p=dropout),
            zero_module(conv_nd(dims, self.out_channels, self.out_channels, 3, padding=1)),
        )
        if self.out_channels == channels:
            self.skip_connection = nn.Identity()
        elif use_conv:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 3, padding=1)
        else:
            self.skip_connection = conv_nd(dims, channels, self.out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        """x: [N, C, ...], emb: [N, emb_channels] -> [N, out_channels, ...]."""
        # The norm outputs, convolution outputs and sums below are fresh tensors that autograd does not keep, so
        # activations and additions run in place on them: fewer allocations, less memory traffic.
        h = F.silu(self.in_layers[0](x), inplace=True)
        if self.updown:
            # Resample between the activation and the convolution, as the released models were trained.
            h = self.h_upd(h)
            x = self.x_upd(x)
        h = self.in_layers[2](h)
        emb_out = self.emb_layers(emb).to(h.dtype)
        emb_out = emb_out.view(*emb_out.shape, *([1] * (h.dim() - 2)))  # [N, C] -> [N, C, 1, ...]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = torch.addcmul(shift, self.out_layers[0](h), 1 + scale)
        else:
            h = self.out_layers[0](h.add_(emb_out))
        h = self.out_layers[3](self.out_layers[2](F.silu(h, inplace=True)))
        return h.add_(self.skip_connection(x))


class AttentionBlock(nn.Module):
    """Non-spatial-transformer self-attention over all positions (the pre-SD guided-diffusion path).

    `use_new_attention_order` splits q/k/v before heads; the legacy order splits heads first. The two orders
    read the same `qkv` weights differently, so the flag must match the checkpoint.
    """

    def __init__(
        self, channels: int, num_heads: int = 1, num_head_channels: int = -1, use_new_attention_order: bool = False
    ):
        super().__init__()
        if num_head_channels == -1:
            self.num_heads = num_heads
        elif channels % num_head_channels:
            raise ValueError(f"attention channels {channels} are not divisible by num_head_channels "
                             f"{num_head_channels}; choose a num_head_channels that divides every level's width")
        else:
            self.num_heads = channels // num_head_channels
        self.use_new_attention_order = use_new_attention_order
        self.attention_slice: int | None = None
        self.norm = normalization(channels)
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        self.proj_out = zero_module(conv_nd(1, channels, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, C, ...] -> [B, C, ...]."""
        batch, channels, *spatial = x.shape
        x = x.reshape(batch, channels, -1)  # [B, C, ...] -> [B, C, T]
        qkv = self.qkv(self.norm(x))  # [B, 3C, T]
        head_dim = channels // self.num_heads
        if self.use_new_attention_order:
            qkv = qkv.view(batch, 3, self.num_heads, head_dim, -1).transpose(0, 1)  # -> [3, B, heads, d, T]
        else:
            qkv = qkv.view(batch, self.num_heads, 3, head_dim, -1).permute(2, 0, 1, 3, 4)  # -> [3, B, heads, d, T]
        q, k, v = (part.transpose(-1, -2) for part in qkv)  # each [B, heads, T, d]
        h = attention(q, k, v, self.attention_slice)
        h = h.transpose(-1, -2).reshape(batch, channels, -1)  # [B, heads, T, d] -> [B, C, T]
        return (x + self.proj_out(h)).reshape(batch, channels, *spatial)


def attention_heads(
    channels: int, num_heads: int, num_head_channels: int, legacy: bool, use_spatial_transformer: bool
) -> tuple[int, int]:
    """(heads, head width) of the attention at a level of `channels`, exactly as CompVis derives them.

    A fixed `num_head_channels` overrides `num_heads`. With `legacy`, the non-transformer AttentionBlock is given
    the raw `num_head_channels` (-1 when heads are counted), which it then resolves itself.
    """
    if num_head_channels == -1:
        dim_head = channels // num_heads
    else:
        num_heads = channels // num_head_channels
        dim_head = num_head_channels
    if legacy:
        dim_head = channels // num_heads if use_spatial_transformer else num_head_channels
    return num_heads, dim_head


def embed_timesteps_and_context(time_embed: nn.Sequential, model_channels: int, timesteps: torch.Tensor, batch: int,
                                context: Context, added: torch.Tensor | None = None) -> tuple[torch.Tensor, Context]:
    """The timestep embedding [batch, 4 * model_channels] and the context, in the dtype of `time_embed`'s weights;
    the sinusoidal features are computed in float32 first. A 0-d `timesteps` serves the whole batch. `added`
    [batch, model_channels] joins the sinusoidal features before the MLP (an LCM's projected guidance embedding)."""
    dtype = time_embed[0].weight.dtype
    if timesteps.dim() == 0:
        timesteps = timesteps.expand(batch)
    features = timestep_embedding(timesteps, model_channels).to(dtype)
    emb = time_embed(features if added is None else features + added)
    if isinstance(context, (list, tuple)):
        context = [c if c is None else c.to(dtype) for c in context]
    elif context is not None:
        context = context.to(dtype)
    return emb, context


def per_level(value: Union[int, Sequence[int]], levels: int, name: str) -> list[int]:
    """An int repeated for every level, or a per-level list checked for length."""
    if isinstance(value, int):
        return [value] * levels
    values = list(value)
    if len(values) != levels:
        raise ValueError(f"{name}={values} must be an int or have one entry per level of channel_mult ({levels})")
    return values


def block_transformer_depths(
    num_res_blocks: Sequence[int], attention_resolutions: Sequence[int], transformer_depth: Sequence[int],
    transformer_depth_middle: int, num_attention_blocks: Sequence[int] | None = None,
    transformer_depth_input: Sequence[int] | None = None, transformer_depth_output: Sequence[int] | None = None,
) -> tuple[list[int], int, list[int]]:
    """(depth of each input res block's transformer, the middle block's, each output block's), 0 where a block has
    no attention, in the order of `input_blocks` (res blocks only) and `output_blocks`.

    By default a level's depth goes to every block at a resolution in `attention_resolutions` (and, with
    `num_attention_blocks`, only to that many blocks of the level), as in CompVis and generative-models.
    `transformer_depth_input` / `transformer_depth_output` give every block its own depth instead, as distilled
    SDXL UNets (SSD-1B, Segmind Vega) need; diffusers calls them `transformer_layers_per_block` (per block) and
    `reverse_transformer_layers_per_block`.
    """
    levels = len(num_res_blocks)
    inputs, outputs = [], []
    for level in range(levels):
        for block in range(num_res_blocks[level]):
            attends = 2 ** level in attention_resolutions and (
                num_attention_blocks is None or block < num_attention_blocks[level])
            inputs.append(transformer_depth[level] if attends else 0)
    for level in reversed(range(levels)):
        for block in range(num_res_blocks[level] + 1):
            attends = 2 ** level in attention_resolutions and (
                num_attention_blocks is None or block < num_attention_blocks[level])
            outputs.append(transformer_depth[level] if attends else 0)
    for name, given, default in (("transformer_depth_input", transformer_depth_input, inputs),
                                 ("transformer_depth_output", transformer_depth_output, outputs)):
        if given is None:
            continue
        given = list(given)
        if len(given) != len(default) or any(not isinstance(depth, int) or depth < 0 for depth in given):
            raise ValueError(f"{name}={given} needs {len(default)} depths (whole numbers, 0 for no attention): one "
                             f"per {'res block of input_blocks' if name.endswith('input') else 'output block'}")
        default[:] = given
    if not isinstance(transformer_depth_middle, int) or transformer_depth_middle < 0:
        raise ValueError(f"transformer_depth_middle={transformer_depth_middle!r} must be a whole number (0: the "
                         "middle block is a single res block, as in SSD-1B and Segmind Vega)")
    return inputs, transformer_depth_middle, outputs


class UNetModel(nn.Module):
    """The diffusion UNet with timestep embedding, residual blocks and (cross-)attention.

    Compute dtype follows the weights: inputs, context and embeddings are cast to the weight dtype, the
    timestep embedding is computed in float32 first, and the output is returned in the dtype of `x`.
    """

    def __init__(
        self,
        image_size: int | None,
        in_channels: int,
        model_channels: int,
        out_channels: int,
        num_res_blocks: Union[int, Sequence[int]],
        attention_resolutions: Sequence[int],
        dropout: float = 0,
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        num_classes: Union[int, str, None] = None,
        num_heads: int = -1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        use_spatial_transformer: bool = False,
        transformer_depth: Union[int, Sequence[int]] = 1,
        context_dim: Union[int, Sequence[int], None] = None,
        n_embed: int | None = None,
        legacy: bool = True,
        disable_self_attentions: Sequence[bool] | None = None,
        num_attention_blocks: Sequence[int] | None = None,
        disable_middle_self_attn: bool = False,
        use_linear_in_transformer: bool = False,
        adm_in_channels: int | None = None,
        transformer_depth_middle: int | None = None,
        transformer_depth_input: Sequence[int] | None = None,
        transformer_depth_output: Sequence[int] | None = None,
        time_cond_proj_dim: int | None = None,
    ):
        super().__init__()
        if use_spatial_transformer and context_dim is None:
            raise ValueError("use_spatial_transformer=True needs context_dim (the width of the text embeddings)")
        if context_dim is not None and not use_spatial_transformer:
            raise ValueError(f"context_dim={context_dim} is only used by the spatial transformer; "
                             "set use_spatial_transformer=True or drop context_dim")
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError("set either num_heads or num_head_channels")
        if num_heads_upsample == -1:
            num_heads_upsample = num_heads
        if context_dim is not None and not isinstance(context_dim, int):
            context_dim = list(context_dim)
        channel_mult = list(channel_mult)
        levels = len(channel_mult)
        self.num_res_blocks = per_level(num_res_blocks, levels, "num_res_blocks")
        transformer_depth = per_level(transformer_depth, levels, "transformer_depth")
        if transformer_depth_middle is None:
            transformer_depth_middle = transformer_depth[-1]
        if disable_self_attentions is not None and len(disable_self_attentions) != levels:
            raise ValueError(f"disable_self_attentions={list(disable_self_attentions)} needs one entry per level")
        if num_attention_blocks is not None and (
            len(num_attention_blocks) != levels
            or any(blocks > res for blocks, res in zip(num_attention_blocks, self.num_res_blocks))
        ):
            raise ValueError(f"num_attention_blocks={list(num_attention_blocks)} needs one entry per level, "
                             f"each at most that level's num_res_blocks {self.num_res_blocks}")
        if not use_spatial_transformer and (transformer_depth_input is not None
                                            or transformer_depth_output is not None or transformer_depth_middle == 0):
            raise ValueError("per-block transformer depths and a middle block without attention need "
                             "use_spatial_transformer=True")
        input_depths, transformer_depth_middle, output_depths = block_transformer_depths(
            self.num_res_blocks, attention_resolutions, transformer_depth, transformer_depth_middle,
            num_attention_blocks, transformer_depth_input, transformer_depth_output)

        self.image_size = image_size
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.out_channels = out_channels
        self.attention_resolutions = attention_resolutions
        self.channel_mult = channel_mult
        self.num_classes = num_classes
        self.predict_codebook_ids = n_embed is not None
        # Activations in channels-last layout (set by ldm.optimize.channels_last); the weights' layout is theirs.
        self.channels_last = False
        # What runs `compute` for forward: None, directly; ldm.optimize.enable_graphs sets replayed GPU graphs.
        self.graph_runner: Callable[..., torch.Tensor] | None = None

        time_embed_dim = model_channels * 4
        self.time_embed = nn.Sequential(
            linear(model_channels, time_embed_dim), nn.SiLU(), linear(time_embed_dim, time_embed_dim)
        )
        if num_classes is not None:
            self.label_emb = self._label_embedding(num_classes, adm_in_channels, time_embed_dim)
        # a latent consistency model's guidance embedding, added to the timestep features (diffusers' cond_proj)
        self.time_cond_proj = linear(time_cond_proj_dim, model_channels, bias=False) if time_cond_proj_dim else None

        def attention_layer(ch: int, level: int, heads_for_block: int, depth: int) -> nn.Module:
            heads, dim_head = attention_heads(
                ch, num_heads, num_head_channels, legacy, use_spatial_transformer
            )
            if not use_spatial_transformer:
                return AttentionBlock(ch, heads_for_block, dim_head, use_new_attention_order)
            disable_sa = bool(disable_self_attentions[level]) if disable_self_attentions is not None else False
            return SpatialTransformer(
                ch, heads, dim_head, depth=depth, context_dim=context_dim,
                disable_self_attn=disable_sa, use_linear=use_linear_in_transformer,
            )

        def res_block(ch: int, out_ch: int | None = None, **kwargs) -> ResBlock:
            return ResBlock(ch, time_embed_dim, dropout, out_channels=out_ch, dims=dims,
                            use_scale_shift_norm=use_scale_shift_norm, **kwargs)

        self.input_blocks = nn.ModuleList(
            [TimestepEmbedSequential(conv_nd(dims, in_channels, model_channels, 3, padding=1))]
        )
        input_block_channels = [model_channels]
        ch = model_channels
        for level, mult in enumerate(channel_mult):
            for _ in range(self.num_res_blocks[level]):
                layers = [res_block(ch, mult * model_channels)]
                ch = mult * model_channels
                depth = input_depths.pop(0)
                if depth:
                    layers.append(attention_layer(ch, level, num_heads, depth))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                input_block_channels.append(ch)
            if level != levels - 1:
                downsample = res_block(ch, ch, down=True) if resblock_updown else Downsample(
                    ch, conv_resample, dims=dims, out_channels=ch
                )
                self.input_blocks.append(TimestepEmbedSequential(downsample))
                input_block_channels.append(ch)
        # The width of each input block's output, which a ControlNet copies to size its zero convolutions.
        self.input_block_channels = tuple(input_block_channels)

        heads, dim_head = attention_heads(ch, num_heads, num_head_channels, legacy, use_spatial_transformer)
        if not use_spatial_transformer:
            middle = [res_block(ch), AttentionBlock(ch, heads, dim_head, use_new_attention_order), res_block(ch)]
        elif transformer_depth_middle:
            middle = [res_block(ch), SpatialTransformer(
                ch, heads, dim_head, depth=transformer_depth_middle, context_dim=context_dim,
                disable_self_attn=disable_middle_self_attn, use_linear=use_linear_in_transformer,
            ), res_block(ch)]
        else:  # SSD-1B and Segmind Vega: one res block (diffusers' UNetMidBlock2D with no attention)
            middle = [res_block(ch)]
        self.middle_block = TimestepEmbedSequential(*middle)

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for block in range(self.num_res_blocks[level] + 1):
                skip_ch = input_block_channels.pop()
                layers = [res_block(ch + skip_ch, model_channels * mult)]
                ch = model_channels * mult
                depth = output_depths.pop(0)
                if depth:
                    layers.append(attention_layer(ch, level, num_heads_upsample, depth))
                if level and block == self.num_res_blocks[level]:
                    layers.append(res_block(ch, ch, up=True) if resblock_updown else Upsample(
                        ch, conv_resample, dims=dims, out_channels=ch
                    ))
                self.output_blocks.append(TimestepEmbedSequential(*layers))

        self.out = nn.Sequential(
            normalization(ch),
            nn.SiLU(),
            zero_module(conv_nd(dims, model_channels, out_channels, 3, padding=1)),
        )
        if self.predict_codebook_ids:
            self.id_predictor = nn.Sequential(normalization(ch), conv_nd(dims, model_channels, n_embed, 1))

    @staticmethod
    def _label_embedding(num_classes: Union[int, str], adm_in_channels: int | None, time_embed_dim: int) -> nn.Module:
        if isinstance(num_classes, int):
            return nn.Embedding(num_classes, time_embed_dim)
        if num_classes == "continuous":
            return nn.Linear(1, time_embed_dim)
        if num_classes == "sequential":
            if adm_in_channels is None:
                raise ValueError("num_classes='sequential' needs adm_in_channels (the width of the vector `y`)")
            # Nested Sequential so the keys are label_emb.0.0 / label_emb.0.2 as in SDXL checkpoints.
            return nn.Sequential(nn.Sequential(
                linear(adm_in_channels, time_embed_dim), nn.SiLU(), linear(time_embed_dim, time_embed_dim)
            ))
        raise ValueError(f"num_classes={num_classes!r} is not supported; use an int, 'continuous' or 'sequential'")

    def forward(
        self, x: torch.Tensor, timesteps: torch.Tensor, context: Context = None, y: torch.Tensor | None = None,
        control: Sequence[torch.Tensor] | None = None, timestep_cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: [N, in_channels, H, W], timesteps: [N], context: [N, M, context_dim], y: [N] labels or [N, adm]
        -> [N, out_channels, H, W] (eps or v, depending on how the model was trained).

        `control`: ControlNet residuals, one per input block then one for the middle block, already scaled; each is
        added to that block's skip connection (the middle one to the middle block's output), as in ControlNet's
        ControlledUnetModel. `timestep_cond`: [N, time_cond_proj_dim], a latent consistency model's guidance
        embedding (`guidance_scale_embedding`), for UNets built with `time_cond_proj_dim`."""
        if timestep_cond is not None and self.time_cond_proj is None:
            raise ValueError("timestep_cond is only taken by UNets with a guidance embedding (time_cond_proj_dim)")
        if (y is not None) != (self.num_classes is not None):
            raise ValueError(f"this UNet has num_classes={self.num_classes!r}: pass `y` exactly when it is set")
        if y is not None and y.shape[0] != x.shape[0]:
            raise ValueError(f"y has batch size {y.shape[0]} but x has {x.shape[0]}")
        if control is not None and len(control) != len(self.input_blocks) + 1:
            raise ValueError(f"control has {len(control)} residuals but this UNet takes {len(self.input_blocks) + 1} "
                             "(one per input block and one for the middle block): use a ControlNet built for it")
        if self.graph_runner is not None:
            return self.graph_runner(self.compute, x, timesteps, context, y, control, timestep_cond)
        return self.compute(x, timesteps, context, y, control, timestep_cond)

    def compute(self, x: torch.Tensor, timesteps: torch.Tensor, context: Context, y: torch.Tensor | None,
                control: Sequence[torch.Tensor] | None, timestep_cond: torch.Tensor | None = None) -> torch.Tensor:
        """`forward` after its argument checks."""
        dtype = self.time_embed[0].weight.dtype
        added = None if timestep_cond is None else self.time_cond_proj(timestep_cond.to(dtype))
        emb, context = embed_timesteps_and_context(self.time_embed, self.model_channels, timesteps, x.shape[0], context,
                                                   added)
        if y is not None:
            emb = emb + self.label_emb(y if isinstance(self.label_emb, nn.Embedding) else y.to(dtype))

        layout = torch.channels_last if self.channels_last and x.dim() == 4 else torch.preserve_format
        h = x.to(dtype, memory_format=layout)
        skips = []
        for module in self.input_blocks:
            h = module(h, emb, context)
            skips.append(h)
        h = self.middle_block(h, emb, context)
        if control is not None:
            h = h + control[-1].to(h.dtype)
        for module in self.output_blocks:
            skip = skips.pop()
            if control is not None:
                skip = skip + control[len(skips)].to(skip.dtype)  # after the pop, len(skips) is the skip's index
            h = module(torch.cat([h, skip], dim=1), emb, context)
        head = self.id_predictor if self.predict_codebook_ids else self.out
        return head(h).to(x.dtype, memory_format=torch.contiguous_format)
