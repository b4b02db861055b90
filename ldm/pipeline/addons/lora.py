"""LoRA files merged into the weights (kohya's and diffusers' layouts; see `ldm.lora`)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from ldm.lora import LoraError, apply_lora, check_lora
from ldm.pipeline.addons.base import AddOn
from ldm.pipeline.errors import UsageError

if TYPE_CHECKING:
    from ldm.pipeline.pipeline import Pipeline, Setup
    from ldm.pipeline.request import Request


class Loras(AddOn):
    """LoRA files with their weights, merged in order before the fast paths fuse the projections they name."""

    def __init__(self, specs: Sequence[tuple[str, float]]):
        self.specs = [(str(path), float(weight)) for path, weight in specs]
        for path, _ in self.specs:
            if not Path(path).is_file():
                raise UsageError(f"--lora {path}: not found (use FILE or FILE:WEIGHT, e.g. style.safetensors:0.8)")

    @property
    def text(self) -> str | None:
        """"name:weight, ..." as the metadata records it."""
        return ", ".join(f"{Path(path).stem}:{weight:g}" for path, weight in self.specs) or None

    def check(self, setup: Setup, requests: Sequence[Request]) -> None:
        for path, _ in self.specs:
            try:
                check_lora(setup.skeleton, path)
            except LoraError as error:
                raise UsageError(f"--lora {path}: {error}") from None

    def change_weights(self, pipeline: Pipeline) -> None:
        for path, weight in self.specs:
            try:
                layers = apply_lora(pipeline.model, path, multiplier=weight)
            except LoraError as error:
                raise UsageError(f"--lora {path}: {error}") from None
            pipeline.info(f"LoRA {path}: {layers} layers, weight {weight:g}")

    def record(self, request: Request, index: int) -> dict[str, Any]:
        return {"lora": self.text}
