"""Prompt encoders under their CompVis / Stability names, as the yaml `cond_stage_config` targets them.

Nothing is downloaded: `version` / `arch` only choose the architecture, and the weights come with the SD checkpoint
(`cond_stage_model.transformer.*` for SD 1.x, `cond_stage_model.model.*` for SD 2.x).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

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


def check_clip_skip(clip_skip: int, num_layers: int | None = None) -> int:
    """`clip_skip` if it is a whole number from 1 (the last layer) to num_layers + 1 (the embeddings)."""
    if isinstance(clip_skip, bool) or not isinstance(clip_skip, int) or clip_skip < 1:
        raise ValueError(f"clip_skip={clip_skip!r} must be a whole number of at least 1 (1: the last layer, as "
                         "without clip skip; 2: the penultimate)")
    if num_layers is not None and clip_skip > num_layers + 1:
        raise ValueError(f"clip_skip={clip_skip} is more than this text encoder's {num_layers} layers + 1 "
                         f"(its embeddings): use 1..{num_layers + 1}")
    return clip_skip


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

    `clip_skip` (attribute, also a constructor argument; None by default): AUTOMATIC1111's "Clip skip" N, the
    hidden state N layers from the end (HF `hidden_states[-N]`: N = 1 the last layer, 2 the penultimate, up to the
    embeddings at layers + 1). With layer "last" it is followed by the final layer norm, as A1111 reads SD 1.x
    (N = 1 is exactly "last"); with layer "hidden" it replaces `layer_idx` and has no final norm, as A1111 reads
    SDXL's CLIP ViT-L when its "Clip skip SDXL" option is on. None: `layer` as configured. Set it per call with
    `use_clip_skip`, which knows which encoders of a model A1111 applies it to.
    """

    LAYERS = ("last", "pooled", "hidden")

    def __init__(self, version: str = "openai/clip-vit-large-patch14", max_length: int = 77, layer: str = "last",
                 layer_idx: int | None = None, vocab_size: int | None = None, width: int | None = None,
                 layers: int | None = None, heads: int | None = None, clip_skip: int | None = None):
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
        self.clip_skip = clip_skip
        freeze(self)

    @property
    def clip_skip(self) -> int | None:
        return self._clip_skip

    @clip_skip.setter
    def clip_skip(self, value: int | None) -> None:
        if value is not None:
            if self.layer == "pooled":
                raise ValueError("clip_skip needs layer 'last' (SD 1.x) or 'hidden' (SDXL); this encoder returns "
                                 "the pooled embedding")
            check_clip_skip(value, self.transformer.text_model.num_layers)
        self._clip_skip = value

    def tokenize(self, texts: str | Sequence[str]) -> torch.LongTensor:
        """[B, max_length] ids on the device of the weights, padded with the end token as HF pads."""
        device = self.transformer.text_model.embeddings.token_embedding.weight.device
        return self.tokenizer(texts, context_length=self.max_length).to(device)

    def forward(self, texts: str | Sequence[str]) -> torch.Tensor:
        return self.encode_tokens(self.tokenize(texts))

    def encode_tokens(self, tokens: torch.LongTensor) -> torch.Tensor:
        """Token ids [B, T] (start, prompt, end, padding; T <= max_length) -> the chosen layer's states."""
        if self.clip_skip is not None:
            text_model = self.transformer.text_model
            # hidden_states[-N] of all layers is the last of the first (layers + 1 - N): the rest need not run
            states = text_model.hidden_states(tokens, num_layers=text_model.num_layers + 1 - self.clip_skip)
            return text_model.final_layer_norm(states[-1]) if self.layer == "last" else states[-1]
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


def clip_skip_encoders(model: nn.Module, sdxl_clip_l_skip: bool = False) -> list[FrozenCLIPEmbedder]:
    """The text encoders of `model` that AUTOMATIC1111 applies its "Clip skip" to: SD 1.x's CLIP text encoder
    (`cond_stage_model`); of SDXL's conditioner, the CLIP ViT-L only with `sdxl_clip_l_skip` (A1111's "Clip skip
    SDXL" option, off by default and not written into its infotexts). None of SD 2.x and SDXL's OpenCLIP encoders:
    A1111 ignores clip skip for them (they keep their configured layer, the penultimate)."""
    conditioner = getattr(model, "conditioner", None)
    if conditioner is not None:
        return ([embedder for embedder in conditioner.embedders if isinstance(embedder, FrozenCLIPEmbedder)]
                if sdxl_clip_l_skip else [])
    encoder = getattr(model, "cond_stage_model", None)
    return [encoder] if isinstance(encoder, FrozenCLIPEmbedder) else []


@contextmanager
def use_clip_skip(model: nn.Module, clip_skip: int, sdxl_clip_l_skip: bool = False
                  ) -> Iterator[list[FrozenCLIPEmbedder]]:
    """Within the block, `model`'s conditioning (`get_learned_conditioning`, `get_unconditional_conditioning`,
    `weighted_conditioning`) uses AUTOMATIC1111's clip skip `clip_skip` (1: as without it); the encoders' own
    setting is restored after. Yields the encoders it applies to (`clip_skip_encoders`): none means the model
    ignores clip skip, as A1111 does for it. The setting lives on the model's encoders while the block runs, so
    one model should not be conditioned from two threads at once."""
    check_clip_skip(clip_skip)
    encoders = clip_skip_encoders(model, sdxl_clip_l_skip)
    previous = [encoder.clip_skip for encoder in encoders]
    try:
        for encoder in encoders:
            encoder.clip_skip = clip_skip
        yield encoders
    finally:
        for encoder, value in zip(encoders, previous):
            encoder.clip_skip = value
