"""txt2img --refiner / --refiner_switch: SDXL's base-to-refiner hand-off within one sampling schedule.

Everything is checked before any model loads (an SDXL base as --ckpt, an SDXL refiner file, k-diffusion samplers);
the refiner loads once beside the base, gets its own conditioning (its aesthetic scores, the same size
conditioning) and denoises the last part of every batch's schedule (`ldm.models.diffusion.refiner_handoff`).
"""
from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ldm.cli.arguments import UsageError
from ldm.cli.metadata import ImageRecord
from ldm.cli.plan import RunPlan

DEFAULT_SWITCH = 0.8  # diffusers' documented example: the base runs 80% of the schedule


@dataclass
class RefinerRecord(ImageRecord):
    """A txt2img image's settings, plus the refiner that finished it and where it took over."""

    refiner: str = ""
    refiner_switch: float = DEFAULT_SWITCH

    def extra_parameters(self) -> list[tuple[str, str]]:
        return [("Refiner", self.refiner), ("Refiner switch at", repr(float(self.refiner_switch)))]


def _family(path: str) -> str | None:
    """The checkpoint family the loader sees in `path` ("xl-base", "xl-refiner", ...); None when unreadable."""
    from ldm.checkpoints import CheckpointError, read_shapes
    from ldm.loading import LoadError, detect_family

    try:
        return detect_family(read_shapes(path))
    except (CheckpointError, LoadError):
        return None


class Refiner:
    """The --refiner model and its switch; `model` is set by `load`."""

    def __init__(self, path: str, switch: float):
        self.path, self.switch = path, switch
        self.name = Path(path).stem
        self.model: Any = None

    @classmethod
    def from_flags(cls, opt: argparse.Namespace, plan: RunPlan) -> "Refiner | None":
        """The refiner the flags ask for (None without --refiner); UsageError (one line) for what cannot run."""
        from ldm.loading import LoadError, check_loadable
        from ldm.models.diffusion.refiner_handoff import resolves_handoff

        if opt.refiner is None:
            if opt.refiner_switch is not None:
                raise UsageError(f"--refiner_switch {opt.refiner_switch} needs --refiner (an SDXL refiner file)")
            return None
        recorded = plan.source_info.get("refiner_switch", DEFAULT_SWITCH)  # --metadata_from a hand-off image
        switch = recorded if opt.refiner_switch is None else opt.refiner_switch
        if not 0.0 < switch < 1.0:  # also refuses NaN
            raise UsageError(f"--refiner_switch {switch} is outside (0, 1): it is the fraction of the sampling the "
                             f"base runs (default {DEFAULT_SWITCH})")
        base = _family(opt.ckpt)
        if base is not None and base != "xl-base":
            raise UsageError(f"--refiner needs an SDXL base checkpoint as --ckpt; {opt.ckpt} is {base}: use "
                             f"sd_xl_base_1.0.safetensors")
        if not os.path.isfile(opt.refiner):
            raise UsageError(f"--refiner {opt.refiner} not found: pass an SDXL refiner checkpoint file")
        family = _family(opt.refiner)
        if family != "xl-refiner":
            raise UsageError(f"--refiner {opt.refiner} is not an SDXL refiner checkpoint (its weights are "
                             f"{family or 'not a model the loader reads'}): pass sd_xl_refiner_1.0.safetensors")
        try:
            check_loadable(opt.refiner)
        except LoadError as error:
            raise UsageError(f"--refiner {opt.refiner}: {error}") from None
        if opt.offload:
            raise UsageError(f"--refiner cannot be combined with --offload {opt.offload} yet: leave one out")
        for image in plan.images:
            sampler = image.settings["sampler"]
            if not resolves_handoff(sampler):
                raise UsageError(f"--refiner takes over mid-schedule, which the {sampler} sampler cannot: use a "
                                 f"k-diffusion sampler (euler, euler_a, dpmpp_2m, ...)")
        return cls(opt.refiner, switch)

    def load(self, device: torch.device, dtype: torch.dtype) -> None:
        from ldm import optimize
        from ldm.loading import load_model

        print(f"Loading refiner from {self.path}", flush=True)
        self.model = load_model(self.path, device=device, dtype=dtype)
        optimize.apply_fast_paths(self.model, device)

    def sample(self, base: Any, shape: tuple[int, ...], base_conditioning: tuple[Any, Any],
               refiner_conditioning: tuple[Any, Any], sampler: str, steps: int, scale: float, noise: Any,
               eta: float | None) -> torch.Tensor:
        from ldm.models.diffusion.refiner_handoff import sample_with_refiner

        return sample_with_refiner(base, self.model, sampler, steps, shape, self.switch, base_conditioning,
                                   refiner_conditioning, scale, noise, eta=eta)

    def record(self, record: ImageRecord) -> RefinerRecord:
        return RefinerRecord(**record.to_mapping(), refiner=self.name, refiner_switch=self.switch)
