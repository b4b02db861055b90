"""SDXL's conditioner: a list of embedders whose outputs are joined by rank into the UNet's inputs.

The text encoders are `ldm`'s (their constructors already take sgm's `params`); the weights come with the
checkpoint under `conditioner.embedders.N.`.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from ldm.modules.diffusionmodules.util import timestep_embedding
from ldm.modules.encoders.modules import FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder, FrozenOpenCLIPEmbedder2
from ldm.util import instantiate_from_config

__all__ = ["GeneralConditioner", "ConcatTimestepEmbedderND", "FrozenCLIPEmbedder", "FrozenOpenCLIPEmbedder",
           "FrozenOpenCLIPEmbedder2"]


class ConcatTimestepEmbedderND(nn.Module):
    """Each of the `dims` numbers per sample (a size, a crop corner, a score) as an `outdim` sinusoidal embedding,
    concatenated: [B, dims] -> [B, dims * outdim]."""

    def __init__(self, outdim: int):
        super().__init__()
        self.outdim = outdim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 1:
            x = x[:, None]
        if x.ndim != 2:
            raise ValueError(f"expected [batch] or [batch, dims] numbers, got shape {tuple(x.shape)}")
        batch, dims = x.shape
        embedding = timestep_embedding(x.reshape(-1), self.outdim)  # [B * dims, outdim]
        return embedding.reshape(batch, dims * self.outdim)


class GeneralConditioner(nn.Module):
    """Runs every embedder on its `input_key` of a batch dict and joins the outputs by rank: [B, D] outputs are
    concatenated into "vector", [B, T, D] into "crossattn" (along D), [B, C, H, W] into "concat" (along C).

    Each entry of `emb_models` is a config with `target`/`params` plus `input_key` (or `input_keys`). Its
    `is_trainable`, `ucg_rate` and `legacy_ucg_value` only matter in training (which embedders learn, and how
    often a prompt is dropped to train the unconditional model) and are not used here.
    """

    OUTPUT_DIM2KEYS = {2: "vector", 3: "crossattn", 4: "concat"}
    KEY2CATDIM = {"vector": 1, "crossattn": 2, "concat": 1}

    def __init__(self, emb_models: Sequence[Mapping[str, Any]]):
        super().__init__()
        embedders = []
        for index, config in enumerate(emb_models):
            embedder = instantiate_from_config(config)
            if "input_key" in config:
                embedder.input_key, embedder.input_keys = config["input_key"], None
            elif "input_keys" in config:
                embedder.input_key, embedder.input_keys = None, list(config["input_keys"])
            else:
                raise KeyError(f"emb_models[{index}] ({config.get('target')}) needs 'input_key' or 'input_keys': "
                               "the batch entry it embeds")
            embedders.append(embedder.eval())
        self.embedders = nn.ModuleList(embedders)

    @property
    def input_keys(self) -> list[str]:
        """The batch entries the embedders read."""
        keys = []
        for embedder in self.embedders:
            keys += [embedder.input_key] if embedder.input_key is not None else embedder.input_keys
        return keys

    def forward(self, batch: Mapping[str, Any], force_zero_embeddings: Sequence[str] | None = None,
                run_embedder: Callable[..., Any] | None = None) -> dict[str, torch.Tensor]:
        """The conditioning dict; embedders reading a key in `force_zero_embeddings` contribute zeros (of the shape
        they would have), as sgm makes SDXL's unconditional text embedding. `run_embedder(embedder, *inputs)`
        replaces calling each embedder (prompt weighting encodes the text embedders its own way)."""
        run_embedder = run_embedder or (lambda embedder, *inputs: embedder(*inputs))
        force_zero_embeddings = force_zero_embeddings or []
        missing = [key for key in self.input_keys if key not in batch]
        if missing:
            raise KeyError(f"the conditioning batch lacks {missing}; it has {sorted(batch)}")
        output: dict[str, torch.Tensor] = {}
        for embedder in self.embedders:
            if embedder.input_key is not None:
                outputs = run_embedder(embedder, batch[embedder.input_key])
            else:
                outputs = run_embedder(embedder, *[batch[key] for key in embedder.input_keys])
            for embedding in outputs if isinstance(outputs, (list, tuple)) else [outputs]:
                key = self.OUTPUT_DIM2KEYS[embedding.dim()]
                if embedder.input_key in force_zero_embeddings:
                    embedding = torch.zeros_like(embedding)
                output[key] = (torch.cat((output[key], embedding), self.KEY2CATDIM[key]) if key in output
                               else embedding)
        return output
