"""The end-of-run report, in the spirit of published GPU comparisons: load, per-image and total time, it/s, memory."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field

import torch

from ldm.pipeline.memory import gib


def peak_memory_bytes(device: torch.device) -> tuple[int | None, str]:
    """Peak memory and what it measures: the accelerator's allocator peak, or the process's max RSS on the CPU."""
    backend = getattr(torch, device.type, None) if device.type != "cpu" else None
    peak = getattr(backend, "max_memory_allocated", None)
    if peak is not None:
        return int(peak(device)), f"{device.type} allocated"
    try:
        import resource
    except ImportError:  # not on Windows
        return None, "unknown"
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss * (1 if sys.platform == "darwin" else 1024), "process max RSS"  # Linux reports KiB, macOS bytes


@dataclass
class RunSummary:
    """Times gathered during a run; `lines()` formats them."""

    device: torch.device
    dtype: torch.dtype
    started: float = field(default_factory=time.perf_counter)
    load: dict[str, float] = field(default_factory=dict)
    warm_up: float | None = None  # --compile / --cuda_graphs: compiling or capturing before the first batch
    sampling_seconds: float = 0.0
    decoding_seconds: float = 0.0
    images: int = 0
    steps: int = 0  # sampler steps summed over batches: one it is one step of one batch, as progress bars count

    def add_batch(self, images: int, steps: int, sampling: float, decoding: float) -> None:
        self.images += images
        self.steps += steps
        self.sampling_seconds += sampling
        self.decoding_seconds += decoding

    def lines(self) -> list[str]:
        total = time.perf_counter() - self.started
        load_total = sum(self.load.values())
        parts = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in self.load.items())
        lines = [f"device: {self.device} ({str(self.dtype).replace('torch.', '')})",
                 f"model load: {load_total:.2f} s ({parts})" if parts else "model load: -"]
        if self.warm_up is not None:
            lines.append(f"warm-up (compile/capture, once per batch shape): {self.warm_up:.2f} s")
        if self.images:
            per_image = self.sampling_seconds / self.images
            rate = self.steps / self.sampling_seconds if self.sampling_seconds > 0 else float("inf")
            lines.append(f"sampling: {self.images} images in {self.sampling_seconds:.2f} s, {per_image:.2f} s/image, "
                         f"{rate:.2f} it/s; decoding {self.decoding_seconds:.2f} s")
        peak, what = peak_memory_bytes(self.device)
        lines.append(f"peak memory: {gib(peak)} ({what})" if peak is not None else "peak memory: unknown")
        lines.append(f"total: {total:.2f} s")
        return lines
