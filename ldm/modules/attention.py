"""Transformer blocks of the diffusion UNet: cross-attention, GEGLU feed-forward, and the spatial transformer.

Attribute names reproduce the keys of the released CompVis / Stability-AI checkpoints
(`to_q`, `to_out.0`, `ff.net.0.proj`, `transformer_blocks.N.attn2`, `proj_in`, ...).
"""
from __future__ import annotations

import functools
from typing import Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.diffusionmodules.util import GroupNorm32

# Devices whose fp16/bf16 attention may run without a fused kernel. Fused GPU kernels accumulate the scores in
# float32 already; elsewhere SD 2.x overflows in half precision, so these compute the attention in float32.
_FLOAT32_ATTENTION_DEVICES = frozenset({"cpu", "mps"})

Context = Union[torch.Tensor, Sequence[Union[torch.Tensor, None]], None]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slice_size: int | None = None) -> torch.Tensor:
    """Softmax attention softmax(q k^T / sqrt(d)) v over [B, heads, N, d] tensors.

    The single place every attention in the UNet goes through, so a faster kernel can be swapped in here. With
    `slice_size`, queries are processed `slice_size` at a time: the same result, with the score matrix bounded to
    [B, heads, slice_size, M] on back-ends whose kernel materialises it (see ldm.optimize.enable_attention_slicing).
    """
    if slice_size is not None and q.shape[-2] > slice_size:
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        for start in range(0, q.shape[-2], slice_size):
            out[..., start:start + slice_size, :] = attention(q[..., start:start + slice_size, :], k, v)
        return out
    if q.dtype in (torch.float16, torch.bfloat16) and q.device.type in _FLOAT32_ATTENTION_DEVICES:
        return F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v)


def stacked_weight(*tensors: torch.Tensor) -> torch.Tensor | None:
    """`tensors` (weights [out, in, ...] or biases [out]) as one [sum of out, ...] tensor without copying, when they
    lie back to back in one storage (ldm.optimize.fuse_projections lays them out so); None otherwise.

    Checked on every call, so a model whose weights were moved or replaced after fusing simply runs unfused. Under
    torch.compile, which cannot trace storage addresses, it is None (the compiler fuses on its own terms).
    """
    if torch.compiler.is_compiling():
        return None
    first = tensors[0]
    row = first[0].numel() if first.dim() > 1 else 1
    offset = first.storage_offset()
    storage = first.untyped_storage().data_ptr()
    for tensor in tensors:
        if (tensor.untyped_storage().data_ptr() != storage or tensor.storage_offset() != offset
                or not tensor.is_contiguous() or tensor.dtype != first.dtype or tensor.shape[1:] != first.shape[1:]):
            return None
        offset += tensor.numel()
    rows = sum(tensor.shape[0] for tensor in tensors)
    return first.as_strided((rows, row), (row, 1)) if first.dim() > 1 else first.as_strided((rows,), (1,))


def split_fused(projected: torch.Tensor, parts: int, heads: int) -> list[torch.Tensor]:
    """[B, N, parts * heads * d] from a stacked projection -> `parts` views [B, heads, N, d] (no copies)."""
    batch, tokens, width = projected.shape
    return list(projected.view(batch, tokens, parts, heads, width // (parts * heads)).permute(2, 0, 3, 1, 4))


@functools.lru_cache(maxsize=None)
def onednn_linear_available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear`; on the CPU without autograd, oneDNN's matrix product instead of the default (MKL) one: it adds the
    bias in the same pass and measured 8-25% faster on Stable Diffusion's shapes (docs/benchmarks.md)."""
    if (not torch.compiler.is_compiling() and x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16)
            and weight.dtype == x.dtype and (bias is None or bias.dtype == x.dtype)
            and x.is_contiguous() and weight.is_contiguous()
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and onednn_linear_available()):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, N, heads * d] -> [B, heads, N, d]."""
    batch, tokens, width = x.shape
    return x.view(batch, tokens, heads, width // heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, heads, N, d] -> [B, N, heads * d]."""
    batch, heads, tokens, head_dim = x.shape
    return x.transpose(1, 2).reshape(batch, tokens, heads * head_dim)


class CrossAttention(nn.Module):
    """Multi-head attention of `x` over `context` (over `x` itself when no context is given).

    `attention_slice` (None: off) is the number of queries per attention call; see `attention`.
    """

    def __init__(
        self, query_dim: int, context_dim: int | None = None, heads: int = 8, dim_head: int = 64, dropout: float = 0.0
    ):
        super().__init__()
        inner_dim = heads * dim_head
        context_dim = query_dim if context_dim is None else context_dim
        self.heads = heads
        self.attention_slice: int | None = None
        self.to_q = nn.Linear(query_dim, inner_dim, bias=False)
        self.to_k = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, N, query_dim], context: [B, M, context_dim] -> [B, N, query_dim]."""
        qkv = stacked_weight(self.to_q.weight, self.to_k.weight, self.to_v.weight) if context is None else None
        if qkv is not None:  # self-attention with fused projections: one matrix product
            q, k, v = split_fused(linear(x, qkv), 3, self.heads)
        else:
            context = x if context is None else context
            q = split_heads(self.to_q(x), self.heads)
            kv = stacked_weight(self.to_k.weight, self.to_v.weight)
            if kv is not None:
                k, v = split_fused(linear(context, kv), 2, self.heads)
            else:
                k, v = split_heads(self.to_k(context), self.heads), split_heads(self.to_v(context), self.heads)
        return self.to_out(merge_heads(attention(q, k, v, self.attention_slice)))


class GEGLU(nn.Module):
    """Gated GELU projection (Shazeer 2020): one linear layer yields the value and its GELU gate."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        value, gate = self.proj(x).chunk(2, dim=-1)
        gate = F.gelu(gate)
        return gate * value if gate.requires_grad else gate.mul_(value)  # in place: one allocation less


class FeedForward(nn.Module):
    """Transformer MLP; `glu=True` (Stable Diffusion) uses GEGLU for the first projection."""

    def __init__(self, dim: int, dim_out: int | None = None, mult: int = 4, glu: bool = False, dropout: float = 0.0):
        super().__init__()
        inner_dim = int(dim * mult)
        dim_out = dim if dim_out is None else dim_out
        project_in = GEGLU(dim, inner_dim) if glu else nn.Sequential(nn.Linear(dim, inner_dim), nn.GELU())
        self.net = nn.Sequential(project_in, nn.Dropout(dropout), nn.Linear(inner_dim, dim_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """Pre-norm block: self-attention, cross-attention to the context, gated feed-forward.

    With `disable_self_attn` the first attention also attends to the context instead of to `x`.
    """

    def __init__(
        self,
        dim: int,
        n_heads: int,
        d_head: int,
        dropout: float = 0.0,
        context_dim: int | None = None,
        gated_ff: bool = True,
        disable_self_attn: bool = False,
    ):
        super().__init__()
        self.disable_self_attn = disable_self_attn
        self.attn1 = CrossAttention(
            dim, context_dim=context_dim if disable_self_attn else None, heads=n_heads, dim_head=d_head, dropout=dropout
        )
        self.ff = FeedForward(dim, dropout=dropout, glu=gated_ff)
        self.attn2 = CrossAttention(dim, context_dim=context_dim, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, N, dim], context: [B, M, context_dim] -> [B, N, dim]."""
        # residuals are added in place to the branch outputs, fresh tensors that autograd does not keep
        x = self.attn1(self.norm1(x), context=context if self.disable_self_attn else None).add_(x)
        x = self.attn2(self.norm2(x), context=context).add_(x)
        return self.ff(self.norm3(x)).add_(x)


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of an image-shaped feature map, conditioned on a token context.

    Normalize, project to `n_heads * d_head` channels (1x1 conv, or a Linear on tokens when `use_linear`, as in
    SD 2.x), run `depth` transformer blocks, project back and add the input. `context_dim` and the `context` given
    to forward may be lists with one entry per block.
    """

    def __init__(
        self,
        in_channels: int,
        n_heads: int,
        d_head: int,
        depth: int = 1,
        dropout: float = 0.0,
        context_dim: int | Sequence[int] | None = None,
        disable_self_attn: bool = False,
        use_linear: bool = False,
    ):
        super().__init__()
        if context_dim is None or isinstance(context_dim, int):
            context_dims = [context_dim] * depth
        else:
            context_dims = list(context_dim)
            if len(context_dims) != depth:
                raise ValueError(f"context_dim list {context_dims} must have one entry per block (depth={depth})")
        inner_dim = n_heads * d_head
        self.in_channels = in_channels
        self.use_linear = use_linear
        self.norm = GroupNorm32(32, in_channels, eps=1e-6)
        if use_linear:
            self.proj_in = nn.Linear(in_channels, inner_dim)
        else:
            self.proj_in = nn.Conv2d(in_channels, inner_dim, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(
                inner_dim, n_heads, d_head, dropout=dropout, context_dim=context_dims[d],
                disable_self_attn=disable_self_attn,
            )
            for d in range(depth)
        )
        # Zero-initialised so a freshly built block is the identity; checkpoints overwrite it.
        if use_linear:
            self.proj_out = nn.Linear(inner_dim, in_channels)
        else:
            self.proj_out = nn.Conv2d(inner_dim, in_channels, kernel_size=1)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor, context: Context = None) -> torch.Tensor:
        """x: [B, C, H, W], context: [B, M, context_dim] or a list of those, one per block -> [B, C, H, W]."""
        contexts = list(context) if isinstance(context, (list, tuple)) else [context]
        if len(contexts) == 1:
            contexts = contexts * len(self.transformer_blocks)
        elif len(contexts) != len(self.transformer_blocks):
            raise ValueError(f"got {len(contexts)} contexts for {len(self.transformer_blocks)} transformer blocks; "
                             "pass one context tensor or a list with one per block")
        batch, channels, height, width = x.shape
        x_in = x
        x = self.norm(x)
        if x.is_contiguous(memory_format=torch.channels_last):
            # channels-last pixels already are tokens [B, H*W, C]: no transposes, and the 1x1 projections are
            # plain matrix products on them
            tokens = x.permute(0, 2, 3, 1).reshape(batch, height * width, channels)
            tokens = linear(tokens, self.proj_in.weight.flatten(1), self.proj_in.bias)
            for block, block_context in zip(self.transformer_blocks, contexts):
                tokens = block(tokens, context=block_context)
            tokens = linear(tokens, self.proj_out.weight.flatten(1), self.proj_out.bias)
            return tokens.view(batch, height, width, channels).permute(0, 3, 1, 2).add_(x_in)  # -> [B, C, H, W]
        if not self.use_linear:
            x = self.proj_in(x)
        x = x.flatten(2).transpose(1, 2)  # [B, C, H, W] -> [B, H*W, C]
        if self.use_linear:
            x = self.proj_in(x)
        for block, block_context in zip(self.transformer_blocks, contexts):
            x = block(x, context=block_context)
        if self.use_linear:
            x = self.proj_out(x)
        x = x.transpose(1, 2).reshape(batch, -1, height, width)  # [B, H*W, C] -> [B, C, H, W]
        if not self.use_linear:
            x = self.proj_out(x)
        return x + x_in
