"""The one protocol every add-on follows (LoRA, embeddings, ControlNet, refiner, init image, mask, upscaling).

An add-on is made from its inputs, which it reads and checks at once (files exist, images decode, numbers lie in
range). Then the pipeline calls, in this order, only the hooks the add-on overrides:

- `check(setup, requests)`: against the model's config and weight shapes, before any weight is read;
- `change_weights(pipeline)`: merge into the weights (LoRA), before the fast paths lay them out;
- `load(pipeline)`: load what the add-on brings (a refiner, a ControlNet), or give the text encoders new tokens;
  add-ons with `load_order` 1 load after those with 0, so embeddings reach a refiner's text encoders too;
- `before_sampling(pipeline, request)`: per batch (a ControlNet attached at the batch's size);
- `sample(pipeline, call)`: only a sampling add-on (`samples = True`: init image, mask, upscaling, refiner) replaces
  how a batch's latents are made; at most one per pipeline;
- `record(request, index)`: the fields it contributes to each image's metadata (base fields by name, and
  `ExtraField`s under "extras").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import torch

if TYPE_CHECKING:
    from ldm.pipeline.pipeline import Pipeline, Setup
    from ldm.pipeline.request import Request


@dataclass(frozen=True)
class SampleCall:
    """What a sampling add-on is asked to make: the latents of `request` with `sampler` over `steps` (one DDIM step
    in a warm-up), from its conditioning."""

    request: Request
    cond: Any
    uncond: Any
    sampler: str
    steps: int
    eta: float | None
    warm_up: bool = False


class AddOn:
    """Base class: every hook does nothing; an add-on overrides the ones it needs."""

    samples: ClassVar[bool] = False  # replaces how latents are made (see `sample`)
    load_order: ClassVar[int] = 0

    def check(self, setup: Setup, requests: Sequence[Request]) -> None:
        """UsageError for what cannot work with this model or these requests; nothing heavy."""

    def change_weights(self, pipeline: Pipeline) -> None:
        """Change the loaded model's weights (before the fast paths fuse them)."""

    def load(self, pipeline: Pipeline) -> None:
        """Load what the add-on brings, once the model is loaded and laid out."""

    def before_sampling(self, pipeline: Pipeline, request: Request) -> None:
        """Prepare for one batch."""

    def record(self, request: Request, index: int) -> dict[str, Any]:
        """Metadata fields of image `index` of `request`."""
        return {}

    # --- sampling add-ons only -------------------------------------------------------------------------------------
    def default_size(self, config: Any) -> tuple[int, int] | None:
        """(height, width) of a request that gives none (None: the model's own size)."""
        return None

    def check_model_kind(self, config: Any, ckpt: str) -> None:
        """UsageError when the model is of a kind this sampling add-on cannot drive."""

    def sample(self, pipeline: Pipeline, call: SampleCall) -> tuple[torch.Tensor, int] | None:
        """The batch's latents and the sampler steps that ran; None to sample from noise as usual."""
        return None

    def warm_up_steps(self) -> int:
        """DDIM steps for a warm-up that runs the UNet once."""
        return 1
