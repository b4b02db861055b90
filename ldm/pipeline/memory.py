"""Will it fit? The weights' size per sub-model against the GPU's free memory before loading, and which memory flag
to use when a run does not fit."""
from __future__ import annotations

from typing import Any, Mapping

import torch

from ldm.pipeline.errors import UsageError

# Checkpoint key prefixes of the parts that `--offload model` moves one at a time (SDXL names its text encoders
# `conditioner`).
PARTS = {"unet": ("model.diffusion_model.",), "autoencoder": ("first_stage_model.",),
         "text encoder": ("cond_stage_model.", "conditioner.")}


def gib(size: float) -> str:
    """A size in bytes for people: "1.50 GiB", "12 MiB"."""
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.0f} MiB"


def weight_bytes_by_part(shapes: Mapping[str, tuple[int, ...]], dtype: torch.dtype) -> dict[str, int]:
    """Bytes each sub-model's weights take once loaded in `dtype` (EMA copies and other keys are not loaded)."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    sizes = dict.fromkeys(PARTS, 0)
    for key, shape in shapes.items():
        for part, prefixes in PARTS.items():
            if key.startswith(prefixes):
                count = 1
                for dim in shape:
                    count *= dim
                sizes[part] += count * itemsize
    return sizes


def check_weights_fit(part_bytes: Mapping[str, int], free: int, total: int, offload: str | None,
                      device: torch.device, dtype: torch.dtype) -> None:
    """UsageError naming the flag that helps when the weights the run keeps on `device` exceed its free memory.

    Without offload every part stays on the device; with `--offload model` the largest part must fit; sequential
    offload moves one layer at a time and is not checked. Activations come on top and are left to the run (an
    out-of-memory error there gets the same advice)."""
    precision = str(dtype).replace("torch.", "")
    where = f"{device} has {gib(free)} free of {gib(total)}"
    largest_name, largest = max(part_bytes.items(), key=lambda item: item[1])
    half_hint = " or --precision autocast (fp16)" if dtype == torch.float32 else ""
    if offload is None and sum(part_bytes.values()) > free:
        advice = "use --offload model" if largest <= free else "use --offload sequential"
        raise UsageError(f"the model's weights need {gib(sum(part_bytes.values()))} in {precision} but {where}: "
                         f"{advice}{half_hint}")
    if offload == "model" and largest > free:
        raise UsageError(f"with --offload model the {largest_name} ({gib(largest)} in {precision}) must fit on the "
                         f"GPU at once but {where}: use --offload sequential{half_hint}")


def out_of_memory_advice(options: Any, stage: str, device: torch.device, dtype: torch.dtype, size: str) -> str:
    """The one line for a single image that still does not fit: the memory flags not yet used, most useful first."""
    flags = []
    if stage == "decoding":
        flags += [] if options.vae_tiling else ["--vae_tiling"]
    else:
        flags += [] if options.attention_slicing else ["--attention_slicing"]
    if options.offload is None:
        flags.append("--offload model")
    if options.offload != "sequential":
        flags.append("--offload sequential")
    if dtype == torch.float32:
        flags.append("--bf16" if device.type == "cpu" else "--precision autocast (fp16)")
    tried = "" if flags else ", even with every memory flag"
    flags.append(f"a smaller --H/--W than {size}")
    others = "close other programs" if device.type == "cpu" else "free the GPU of other programs"
    return (f"out of memory on {device} while {stage} one {size} image{tried}: try {', '.join(flags[:-1])}"
            f"{' or ' if len(flags) > 1 else ''}{flags[-1]}; or {others}")
