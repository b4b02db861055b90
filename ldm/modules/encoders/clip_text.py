"""CLIP text transformer with the attribute layout of HF `CLIPTextModel`, so SD 1.x checkpoints load unchanged.

Keys: `text_model.embeddings.{token,position}_embedding.weight`, `text_model.encoder.layers.N.self_attn.{q,k,v,out}
_proj`, `.layer_norm1`, `.mlp.fc1`, `.mlp.fc2`, `.layer_norm2`, `text_model.final_layer_norm`. There is deliberately
no `position_ids` buffer: old checkpoints carry one, and the checkpoint loader drops it by name.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's sigmoid approximation of GELU; the released weights were trained with it."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


def causal_self_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, T, width] queries, keys and values -> [B, T, width]; each position attends to itself and earlier ones."""
    batch, length, width = q.shape
    q, k, v = (t.reshape(batch, length, heads, width // heads).transpose(1, 2) for t in (q, k, v))  # [B, H, T, D]
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return out.transpose(1, 2).reshape(batch, length, width)  # [B, T, width]


def activation_by_name(name: str):
    if name not in ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


@dataclass
class CLIPTextOutput:
    last_hidden_state: torch.Tensor  # [B, T, width], after the final layer norm
    pooler_output: torch.Tensor  # [B, width], last_hidden_state at each prompt's end token
    hidden_states: tuple[torch.Tensor, ...] | None  # embeddings, then every layer's output; no final layer norm


class TokenEmbedding(nn.Embedding):
    """The token embedding table, plus vectors added at run time (textual-inversion embeddings) that prompts reach
    through negative ids: id -1 is added vector 0, -2 vector 1, ...

    Negative ids leave the vocabulary and the checkpoint's `weight` untouched, and keep the end token the largest id
    of a prompt, where the pooled output is read. The added vectors are no parameter or buffer, so state dicts stay
    the released ones; they follow the weight's device and dtype when used.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__(num_embeddings, embedding_dim)
        self.added_vectors: torch.Tensor | None = None  # [added, embedding_dim]

    def add_vectors(self, vectors: torch.Tensor) -> list[int]:
        """Append `vectors` [N, embedding_dim]; returns the N negative ids that stand for them."""
        if vectors.ndim != 2 or vectors.shape[1] != self.embedding_dim:
            raise ValueError(f"vectors of shape {list(vectors.shape)} do not fit a token embedding of width "
                             f"{self.embedding_dim}: expected [N, {self.embedding_dim}]")
        vectors = vectors.detach().to("cpu", torch.float32)
        first = 0 if self.added_vectors is None else self.added_vectors.shape[0]
        self.added_vectors = vectors if self.added_vectors is None else torch.cat([self.added_vectors, vectors])
        return [-(first + index) - 1 for index in range(vectors.shape[0])]

    def forward(self, input_ids: torch.LongTensor) -> torch.Tensor:
        if self.added_vectors is None:
            return super().forward(input_ids)
        added = input_ids < 0
        known = super().forward(input_ids.clamp(min=0))  # [B, T, width]
        extra = self.added_vectors.to(known)[torch.where(added, -input_ids - 1, 0)]  # [B, T, width]
        return torch.where(added[..., None], extra, known)


class CLIPTextEmbeddings(nn.Module):
    def __init__(self, vocab_size: int, width: int, max_positions: int):
        super().__init__()
        self.token_embedding = TokenEmbedding(vocab_size, width)
        self.position_embedding = nn.Embedding(max_positions, width)

    def forward(self, input_ids: torch.LongTensor) -> torch.Tensor:
        length = input_ids.shape[1]
        if length > self.position_embedding.num_embeddings:
            raise ValueError(f"{length} tokens exceed the {self.position_embedding.num_embeddings} positions of "
                             "the text encoder; tokenize with a shorter context length")
        return self.token_embedding(input_ids) + self.position_embedding.weight[:length]


class CLIPAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.q_proj = nn.Linear(width, width)
        self.k_proj = nn.Linear(width, width)
        self.v_proj = nn.Linear(width, width)
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        attended = causal_self_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads)
        return self.out_proj(attended)


class CLIPMLP(nn.Module):
    def __init__(self, width: int, activation: str):
        super().__init__()
        self.activation = activation_by_name(activation)
        self.fc1 = nn.Linear(width, 4 * width)
        self.fc2 = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, width: int, heads: int, activation: str, layer_norm_eps: float):
        super().__init__()
        self.self_attn = CLIPAttention(width, heads)
        self.layer_norm1 = nn.LayerNorm(width, eps=layer_norm_eps)
        self.mlp = CLIPMLP(width, activation)
        self.layer_norm2 = nn.LayerNorm(width, eps=layer_norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, activation: str, layer_norm_eps: float):
        super().__init__()
        self.layers = nn.ModuleList(
            CLIPEncoderLayer(width, heads, activation, layer_norm_eps) for _ in range(layers))


class CLIPTextTransformer(nn.Module):
    def __init__(self, vocab_size: int, width: int, layers: int, heads: int, max_positions: int, activation: str,
                 layer_norm_eps: float):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(vocab_size, width, max_positions)
        self.encoder = CLIPEncoder(width, layers, heads, activation, layer_norm_eps)
        self.final_layer_norm = nn.LayerNorm(width, eps=layer_norm_eps)

    @property
    def num_layers(self) -> int:
        return len(self.encoder.layers)

    def hidden_states(self, input_ids: torch.LongTensor, num_layers: int | None = None) -> list[torch.Tensor]:
        """[embeddings, output of layer 1, ..., of layer `num_layers` (default all)], each [B, T, width], without
        the final layer norm: HF's `hidden_states`. Layers past `num_layers` are not run."""
        num_layers = self.num_layers if num_layers is None else num_layers
        if not 0 <= num_layers <= self.num_layers:
            raise ValueError(f"num_layers={num_layers} is outside 0..{self.num_layers}")
        x = self.embeddings(input_ids)
        hidden_states = [x]
        for layer in self.encoder.layers[:num_layers]:
            x = layer(x)
            hidden_states.append(x)
        return hidden_states

    def forward(self, input_ids: torch.LongTensor, output_hidden_states: bool = False) -> CLIPTextOutput:
        hidden_states = self.hidden_states(input_ids)
        last = self.final_layer_norm(hidden_states[-1])
        # the end token has the largest id, so argmax finds it (the first one, should a prompt repeat it)
        pooled = last[torch.arange(last.shape[0], device=last.device), input_ids.argmax(dim=-1)]
        return CLIPTextOutput(last, pooled, tuple(hidden_states) if output_hidden_states else None)


class CLIPTextModel(nn.Module):
    """OpenAI CLIP's text encoder; defaults are ViT-L/14's, the one SD 1.x uses (123,060,480 parameters)."""

    def __init__(self, vocab_size: int = 49408, width: int = 768, layers: int = 12, heads: int = 12,
                 max_positions: int = 77, activation: str = "quick_gelu", layer_norm_eps: float = 1e-5):
        super().__init__()
        self.text_model = CLIPTextTransformer(vocab_size, width, layers, heads, max_positions, activation,
                                              layer_norm_eps)

    def forward(self, input_ids: torch.LongTensor, output_hidden_states: bool = False) -> CLIPTextOutput:
        return self.text_model(input_ids, output_hidden_states)
