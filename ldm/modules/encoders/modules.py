"""Prompt encoders under their CompVis / Stability names, as the yaml `cond_stage_config` targets them.

Nothing is downloaded: `version` / `arch` only choose the architecture, and the weights come with the SD checkpoint
(`cond_stage_model.transformer.*` for SD 1.x, `cond_stage_model.model.*` for SD 2.x).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from ldm.modules.encoders.clip_text import CLIPTextModel
from ldm.modules.encoders.clip_tokenizer import CLIPTokenizer
from ldm.modules.encoders.open_clip_text import OpenCLIPTextTransformer

CLIP_TEXT_ARCHITECTURES = {
    "openai/clip-vit-large-patch14": dict(vocab_size=49408, width=768, layers=12, heads=12),
    "openai/clip-vit-base-patch32": dict(vocab_size=49408, width=512, layers=12, heads=8),
}

OPEN_CLIP_TEXT_ARCHITECTURES = {
    "ViT-L-14": dict(vocab_size=49408, width=768, layers=12, heads=12, embed_dim=768),
    "ViT-H-14": dict(vocab_size=49408, width=1024, layers=24, heads=16, embed_dim=1024),
    "ViT-bigG-14": dict(vocab_size=49408, width=1280, layers=32, heads=20, embed_dim=1280),
}


def architecture(table: dict[str, dict[str, int]], name: str, overrides: dict[str, int | None]) -> dict[str, int]:
    """Sizes of architecture `name`, with any non-None override (tiny test models) replacing the released value."""
    if name not in table:
        raise ValueError(f"unknown text encoder {name!r}; known: {', '.join(table)} (or pass vocab_size, width, "
                         "layers and heads explicitly)")
    return {**table[name], **{key: value for key, value in overrides.items() if value is not None}}


def check_max_length(max_length: int, positions: int) -> int:
    if not 2 <= max_length <= positions:
        raise ValueError(f"max_length={max_length} must be between 2 (start and end tokens) and the encoder's "
                         f"{positions} positions")
    return max_length


def freeze(module: nn.Module) -> None:
    """Inference only: eval mode and no gradients for the weights."""
    module.eval()
    module.requires_grad_(False)


class AbstractEncoder(nn.Module):
    def encode(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError(f"{type(self).__name__} does not implement encode")


class IdentityEncoder(AbstractEncoder):
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x


class FrozenCLIPEmbedder(AbstractEncoder):
    """OpenAI CLIP text encoder (SD 1.x): prompts -> [B, 77, width].

    `layer`: "last" (after the final layer norm, SD 1.x), "pooled" ([B, 1, width], the end token's state) or
    "hidden" (the output of `encoder.layers` number `layer_idx`, counted as HF `hidden_states`, without the final
    layer norm; SDXL uses 11 = -2).
    """

    LAYERS = ("last", "pooled", "hidden")

    def __init__(self, version: str = "openai/clip-vit-large-patch14", max_length: int = 77, layer: str = "last",
                 layer_idx: int | None = None, vocab_size: int | None = None, width: int | None = None,
                 layers: int | None = None, heads: int | None = None):
        super().__init__()
        sizes = architecture(CLIP_TEXT_ARCHITECTURES, version,
                             dict(vocab_size=vocab_size, width=width, layers=layers, heads=heads))
        if layer not in self.LAYERS:
            raise ValueError(f"layer {layer!r} is not one of {self.LAYERS}")
        if layer == "hidden" and (layer_idx is None or not -sizes["layers"] - 1 <= layer_idx <= sizes["layers"]):
            raise ValueError(f"layer 'hidden' needs layer_idx in -{sizes['layers'] + 1}..{sizes['layers']}, "
                             f"got {layer_idx}")
        self.transformer = CLIPTextModel(**sizes)
        self.tokenizer = CLIPTokenizer()
        self.max_length = check_max_length(max_length, self.transformer.text_model.embeddings.position_embedding
                                           .num_embeddings)
        self.layer = layer
        self.layer_idx = layer_idx
        freeze(self)

    def tokenize(self, texts: str | Sequence[str]) -> torch.LongTensor:
        """[B, max_length] ids on the device of the weights, padded with the end token as HF pads."""
        device = self.transformer.text_model.embeddings.token_embedding.weight.device
        return self.tokenizer(texts, context_length=self.max_length).to(device)

    def forward(self, texts: str | Sequence[str]) -> torch.Tensor:
        return self.encode_tokens(self.tokenize(texts))

    def encode_tokens(self, tokens: torch.LongTensor) -> torch.Tensor:
        """Token ids [B, T] (start, prompt, end, padding; T <= max_length) -> the chosen layer's states."""
        outputs = self.transformer(tokens, output_hidden_states=self.layer == "hidden")
        if self.layer == "last":
            return outputs.last_hidden_state
        if self.layer == "pooled":
            return outputs.pooler_output[:, None, :]  # [B, 1, width]
        return outputs.hidden_states[self.layer_idx]

    def encode(self, texts: str | Sequence[str]) -> torch.Tensor:
        return self(texts)


class FrozenOpenCLIPEmbedder(AbstractEncoder):
    """OpenCLIP text encoder (SD 2.x): prompts -> [B, 77, width].

    `layer`: "last" or "penultimate" (all blocks but the last, then ln_final, as Stability's SD 2.x does).
    `version` names the pretrained weights open_clip would download; here it is only recorded.
    """

    LAYERS = ("last", "penultimate")

    def __init__(self, arch: str = "ViT-H-14", version: str = "laion2b_s32b_b79k", max_length: int = 77,
                 layer: str = "last", vocab_size: int | None = None, width: int | None = None,
                 layers: int | None = None, heads: int | None = None, embed_dim: int | None = None):
        super().__init__()
        sizes = architecture(OPEN_CLIP_TEXT_ARCHITECTURES, arch,
                             dict(vocab_size=vocab_size, width=width, layers=layers, heads=heads, embed_dim=embed_dim))
        if layer not in self.LAYERS:
            raise ValueError(f"layer {layer!r} is not one of {self.LAYERS}")
        self.model = OpenCLIPTextTransformer(**sizes)
        self.tokenizer = CLIPTokenizer.for_open_clip()
        self.max_length = check_max_length(max_length, self.model.positional_embedding.shape[0])
        self.version = version
        self.layer = layer
        freeze(self)

    def tokenize(self, texts: str | Sequence[str]) -> torch.LongTensor:
        """[B, max_length] ids on the device of the weights, padded with 0 as open_clip pads."""
        return self.tokenizer(texts, context_length=self.max_length).to(self.model.token_embedding.weight.device)

    def forward(self, texts: str | Sequence[str]) -> torch.Tensor:
        return self.encode_tokens(self.tokenize(texts))

    def encode_tokens(self, tokens: torch.LongTensor) -> torch.Tensor:
        """Token ids [B, T] (start, prompt, end, padding; T <= max_length) -> [B, T, width]."""
        skipped = 1 if self.layer == "penultimate" else 0
        states = self.model.hidden_states(tokens, num_blocks=self.model.num_blocks - skipped)
        return self.model.ln_final(states[-1])

    def encode(self, texts: str | Sequence[str]) -> torch.Tensor:
        return self(texts)


class FrozenOpenCLIPEmbedder2(AbstractEncoder):
    """OpenCLIP text encoder as SDXL's second embedder (sgm), with the pooled, projected prompt embedding.

    `legacy=True`: the chosen layer after ln_final, as `FrozenOpenCLIPEmbedder`. `legacy=False` (SDXL): the chosen
    layer as it leaves its block, without ln_final; with `always_return_pooled` also the [B, embed_dim] projection
    of the last layer's end token.
    """

    LAYERS = ("last", "penultimate")

    def __init__(self, arch: str = "ViT-H-14", version: str = "laion2b_s32b_b79k", max_length: int = 77,
                 layer: str = "last", always_return_pooled: bool = False, legacy: bool = True,
                 vocab_size: int | None = None, width: int | None = None, layers: int | None = None,
                 heads: int | None = None, embed_dim: int | None = None):
        super().__init__()
        sizes = architecture(OPEN_CLIP_TEXT_ARCHITECTURES, arch,
                             dict(vocab_size=vocab_size, width=width, layers=layers, heads=heads, embed_dim=embed_dim))
        if layer not in self.LAYERS:
            raise ValueError(f"layer {layer!r} is not one of {self.LAYERS}")
        if always_return_pooled and legacy:
            raise ValueError("always_return_pooled needs legacy=False, as in sgm")
        self.model = OpenCLIPTextTransformer(**sizes)
        self.tokenizer = CLIPTokenizer.for_open_clip()
        self.max_length = check_max_length(max_length, self.model.positional_embedding.shape[0])
        self.version = version
        self.layer = layer
        self.always_return_pooled = always_return_pooled
        self.legacy = legacy
        freeze(self)

    def tokenize(self, texts: str | Sequence[str]) -> torch.LongTensor:
        return self.tokenizer(texts, context_length=self.max_length).to(self.model.token_embedding.weight.device)

    def forward(self, texts: str | Sequence[str]) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return self.encode_tokens(self.tokenize(texts))

    def encode_tokens(self, tokens: torch.LongTensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Token ids [B, T] (start, prompt, end, padding; T <= max_length) -> what `forward` returns."""
        states = self.model.hidden_states(tokens)
        chosen = states[-2] if self.layer == "penultimate" else states[-1]
        if self.legacy:
            return self.model.ln_final(chosen)
        if self.always_return_pooled:
            return chosen, self.model.pool(self.model.ln_final(states[-1]), tokens)
        return chosen

    def encode(self, texts: str | Sequence[str]) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        return self(texts)
