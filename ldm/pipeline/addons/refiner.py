"""SDXL's base-to-refiner hand-off within one sampling schedule.

Everything is checked before any model loads (an SDXL base as the checkpoint, an SDXL refiner file, k-diffusion
samplers); the refiner loads once beside the base, gets its own conditioning (its aesthetic scores, the same size
conditioning) and denoises the last part of every batch's schedule (`ldm.models.diffusion.refiner_handoff`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch

from ldm import optimize
from ldm.checkpoints import CheckpointError
from ldm.diffusers_folder import is_diffusers_folder
from ldm.loading import (LoadError, check_loadable, checkpoint_shapes, detect_family, load_config, load_model,
                         resolve_config)
from ldm.models.diffusion.refiner_handoff import resolves_handoff, sample_with_refiner
from ldm.pipeline.addons.base import AddOn, SampleCall
from ldm.pipeline.errors import UsageError
from ldm.pipeline.metadata import ExtraField
from ldm.pipeline.model_info import check_against_model

if TYPE_CHECKING:
    from ldm.pipeline.pipeline import Pipeline, Setup
    from ldm.pipeline.request import Request

DEFAULT_SWITCH = 0.8  # diffusers' documented example: the base runs 80% of the schedule


def checkpoint_family(path: str) -> str | None:
    """The checkpoint family the loader sees in `path` ("xl-base", "xl-refiner", ...); None when unreadable."""
    try:
        return detect_family(checkpoint_shapes(path))
    except (CheckpointError, LoadError):
        return None


class Refiner(AddOn):
    """The SDXL refiner at `path`, taking over after the fraction `switch` of every batch's schedule."""

    samples = True

    def __init__(self, path: str, switch: float = DEFAULT_SWITCH):
        if not 0.0 < switch < 1.0:  # also refuses NaN
            raise UsageError(f"--refiner_switch {switch} is outside (0, 1): it is the fraction of the sampling the "
                             f"base runs (default {DEFAULT_SWITCH})")
        self.path, self.switch = path, float(switch)
        self.name = Path(path).stem
        self.model: Any = None

    def check_model_kind(self, config: Any, ckpt: str) -> None:
        base = checkpoint_family(ckpt)
        if base is not None and base != "xl-base":
            raise UsageError(f"--refiner needs an SDXL base checkpoint as --ckpt; {ckpt} is {base}: use "
                             f"sd_xl_base_1.0.safetensors")

    def check(self, setup: Setup, requests: Sequence[Request]) -> None:
        if not os.path.isfile(self.path) and not is_diffusers_folder(self.path):
            raise UsageError(f"--refiner {self.path} not found: pass an SDXL refiner checkpoint file or diffusers "
                             f"folder")
        family = checkpoint_family(self.path)
        if family != "xl-refiner":
            raise UsageError(f"--refiner {self.path} is not an SDXL refiner checkpoint (its weights are "
                             f"{family or 'not a model the loader reads'}): pass sd_xl_refiner_1.0.safetensors")
        try:
            trust = setup.options.trust_config
            check_loadable(self.path, trust_config=trust)
            refiner_config = load_config(resolve_config(self.path), trust)
        except LoadError as error:
            raise UsageError(f"--refiner {self.path}: {error}") from None
        try:
            check_against_model(requests, refiner_config)  # the refiner's UNet must take every size too
        except UsageError as error:
            raise UsageError(f"--refiner {self.path}: {error}") from None
        if setup.options.offload:
            raise UsageError(f"--refiner cannot be combined with --offload {setup.options.offload} yet: leave one "
                             f"out")
        for request in requests:
            if not resolves_handoff(request.sampler):
                raise UsageError(f"--refiner takes over mid-schedule, which the {request.sampler} sampler cannot: "
                                 f"use a k-diffusion sampler (euler, euler_a, dpmpp_2m, ...)")

    def load(self, pipeline: Pipeline) -> None:
        pipeline.info(f"Loading refiner from {self.path}")
        self.model = load_model(self.path, device=pipeline.device, dtype=pipeline.dtype,
                                trust_config=pipeline.options.trust_config)
        optimize.apply_fast_paths(self.model, pipeline.device)
        pipeline.models.append(self.model)

    def sample(self, pipeline: Pipeline, call: SampleCall) -> tuple[torch.Tensor, int] | None:
        if call.warm_up:  # the warm-up runs the base alone
            return None
        request = call.request
        shape = pipeline.latent_shape(request)
        refiner_conditioning = pipeline.conditioning(request, self.model)
        latents = sample_with_refiner(pipeline.model, self.model, call.sampler, call.steps, shape, self.switch,
                                      (call.cond, call.uncond), refiner_conditioning, request.scale,
                                      pipeline.noise(request), eta=call.eta)
        return latents, call.steps

    def record(self, request: Request, index: int) -> dict[str, Any]:
        return {"extras": [ExtraField("refiner", self.name, "Refiner", self.name),
                           ExtraField("refiner_switch", self.switch, "Refiner switch at", repr(self.switch))]}
