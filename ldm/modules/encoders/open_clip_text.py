"""OpenCLIP's text tower with open_clip's attribute layout, so SD 2.x / SDXL checkpoints load unchanged.

Keys (under `cond_stage_model.model.` in SD 2.x): `token_embedding.weight`, `positional_embedding`,
`transformer.resblocks.N.{ln_1, attn.in_proj_weight, attn.in_proj_bias, attn.out_proj, ln_2, mlp.c_fc, mlp.c_proj}`,
`ln_final`, `text_projection`, `logit_scale`. The causal mask is built inside attention, not stored.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.encoders.clip_text import TokenEmbedding, activation_by_name, causal_self_attention


class PackedSelfAttention(nn.Module):
    """Causal self-attention with q, k, v projections packed in one matrix, as `nn.MultiheadAttention` stores them."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)  # 3 x [B, T, width]
        return self.out_proj(causal_self_attention(q, k, v, self.heads))


class OpenCLIPMLP(nn.Module):
    def __init__(self, width: int, activation: str):
        super().__init__()
        self.c_fc = nn.Linear(width, 4 * width)
        self.activation = activation_by_name(activation)
        self.c_proj = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.activation(self.c_fc(x)))


class ResidualAttentionBlock(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, width: int, heads: int, activation: str, layer_norm_eps: float):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width, eps=layer_norm_eps)
        self.attn = PackedSelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width, eps=layer_norm_eps)
        self.mlp = OpenCLIPMLP(width, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, activation: str, layer_norm_eps: float):
        super().__init__()
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, activation, layer_norm_eps) for _ in range(layers))


class OpenCLIPTextTransformer(nn.Module):
    """The text half of an open_clip `CLIP` model; defaults are ViT-H/14's, the one SD 2.x uses."""

    def __init__(self, vocab_size: int = 49408, width: int = 1024, layers: int = 24, heads: int = 16,
                 embed_dim: int = 1024, context_length: int = 77, activation: str = "gelu",
                 layer_norm_eps: float = 1e-5):
        super().__init__()
        self.token_embedding = TokenEmbedding(vocab_size, width)
        self.positional_embedding = nn.Parameter(torch.zeros(context_length, width))
        self.transformer = Transformer(width, layers, heads, activation, layer_norm_eps)
        self.ln_final = nn.LayerNorm(width, eps=layer_norm_eps)
        self.text_projection = nn.Parameter(torch.zeros(width, embed_dim))
        # CLIP's contrastive temperature: unused for conditioning, but part of every released checkpoint
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    @property
    def num_blocks(self) -> int:
        return len(self.transformer.resblocks)

    def hidden_states(self, tokens: torch.LongTensor, num_blocks: int | None = None) -> list[torch.Tensor]:
        """[embeddings, output of block 1, ..., of block `num_blocks` (default all)], each [B, T, width], without
        ln_final. Blocks past `num_blocks` are not run."""
        num_blocks = self.num_blocks if num_blocks is None else num_blocks
        if not 0 <= num_blocks <= self.num_blocks:
            raise ValueError(f"num_blocks={num_blocks} is outside 0..{self.num_blocks}")
        length = tokens.shape[1]
        if length > self.positional_embedding.shape[0]:
            raise ValueError(f"{length} tokens exceed the {self.positional_embedding.shape[0]} positions of the "
                             "text encoder; tokenize with a shorter context length")
        x = self.token_embedding(tokens) + self.positional_embedding[:length]
        states = [x]
        for block in self.transformer.resblocks[:num_blocks]:
            x = block(x)
            states.append(x)
        return states

    def pool(self, normed: torch.Tensor, tokens: torch.LongTensor) -> torch.Tensor:
        """ln_final'd states [B, T, width] -> projected embedding [B, embed_dim] at each prompt's end token."""
        # the end token has the largest id, so argmax finds it whatever the padding
        at_end = normed[torch.arange(normed.shape[0], device=normed.device), tokens.argmax(dim=-1)]
        return at_end @ self.text_projection

    def forward(self, tokens: torch.LongTensor) -> torch.Tensor:
        """[B, T] -> [B, T, width] after all blocks and ln_final."""
        return self.ln_final(self.hidden_states(tokens)[-1])
