"""Exponential moving average of weights, stored as CompVis's `LitEma` stores it.

Each shadow is a buffer named after its parameter with the dots removed (`diffusion_model.out.2.weight` ->
`diffusion_modelout2weight`), next to the buffers `decay` and `num_updates`; under the training module's `model_ema`
attribute these become the `model_ema.*` keys that `ldm.loading` swaps in with `use_ema`.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Mapping

import torch
from torch import nn


def shadow_name(name: str) -> str:
    return name.replace(".", "")


class LitEma(nn.Module):
    """EMA of `parameters` ({name: parameter}); with `use_num_updates` the decay warms up as (1 + n) / (10 + n)."""

    def __init__(self, parameters: Mapping[str, torch.Tensor], decay: float = 0.9999, use_num_updates: bool = True):
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay {decay} must lie in (0, 1)")
        self.register_buffer("decay", torch.tensor(decay, dtype=torch.float32))
        self.register_buffer("num_updates", torch.tensor(0 if use_num_updates else -1, dtype=torch.int))
        self.shadow_names: dict[str, str] = {}
        for name, parameter in parameters.items():
            shadow = shadow_name(name)
            if shadow in self.shadow_names.values() or shadow in ("decay", "num_updates"):
                raise ValueError(f"parameter {name!r} collides with another EMA shadow named {shadow!r}")
            self.shadow_names[name] = shadow
            self.register_buffer(shadow, parameter.detach().clone())

    def shadow(self, name: str) -> torch.Tensor:
        return getattr(self, self.shadow_names[name])

    def _check(self, parameters: Mapping[str, torch.Tensor]) -> None:
        if parameters.keys() != self.shadow_names.keys():
            missing = sorted(set(self.shadow_names) - set(parameters))
            extra = sorted(set(parameters) - set(self.shadow_names))
            raise ValueError(f"the EMA tracks other parameters than given: missing {missing[:3]}, extra {extra[:3]}")

    @torch.no_grad()
    def update(self, parameters: Mapping[str, torch.Tensor]) -> None:
        """One EMA step towards the current `parameters`."""
        self._check(parameters)
        decay = float(self.decay)
        if int(self.num_updates) >= 0:
            self.num_updates += 1
            updates = int(self.num_updates)
            decay = min(decay, (1 + updates) / (10 + updates))
        for name, parameter in parameters.items():
            self.shadow(name).lerp_(parameter.detach().to(self.shadow(name).dtype), 1.0 - decay)

    @contextmanager
    @torch.no_grad()
    def average_parameters(self, parameters: Mapping[str, torch.Tensor]) -> Iterator[None]:
        """Within the block, `parameters` hold the EMA weights; the trained weights come back afterwards."""
        self._check(parameters)
        stored = {name: parameter.detach().clone() for name, parameter in parameters.items()}
        for name, parameter in parameters.items():
            parameter.copy_(self.shadow(name))
        try:
            yield
        finally:
            for name, parameter in parameters.items():
                parameter.copy_(stored[name])
