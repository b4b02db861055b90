"""Sampling and decoding that fail loudly: sub-batches on out-of-memory, an fp32 retry for NaN/black fp16 decodes."""
from __future__ import annotations

from typing import Callable, Sequence, TypeVar

import numpy as np
import torch

from ldm.pipeline.errors import GenerationError

Item = TypeVar("Item")
Out = TypeVar("Out")


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Decoded images [B, 3, H, W] in [-1, 1] to uint8 [B, H, W, 3], truncating 255 * x as the CompVis script does."""
    unit = torch.nan_to_num(torch.clamp((images.float() + 1.0) / 2.0, min=0.0, max=1.0), nan=0.0)
    return (255.0 * unit.permute(0, 2, 3, 1).cpu().numpy()).astype(np.uint8)


def is_out_of_memory(error: BaseException) -> bool:
    """Allocator failures of any back-end (torch.OutOfMemoryError, or MPS's RuntimeError text)."""
    oom_type = getattr(torch, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(error, oom_type):
        return True
    if isinstance(error, MemoryError):
        return True
    text = str(error).lower()  # CPU: "DefaultCPUAllocator: can't allocate memory", MPS: "... out of memory"
    return isinstance(error, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def free_accelerator_memory(device: torch.device) -> None:
    backend = getattr(torch, device.type, None) if device.type != "cpu" else None
    empty_cache = getattr(backend, "empty_cache", None)
    if empty_cache is not None:
        empty_cache()


def run_in_sub_batches(run: Callable[[list[Item]], Out], items: Sequence[Item], on_retry: Callable[[int, int], None],
                       on_exhausted: Callable[[], str]) -> list[Out]:
    """[`run(items)`], or on out-of-memory the outputs of runs on halves, down to single items, in order.

    The images stay the same (up to float rounding) because every image has its own noise stream. `on_retry(size,
    half)` reports a split; when even one item does not fit, GenerationError carries `on_exhausted()`, the advice on
    which flags help.
    """
    items = list(items)
    try:
        return [run(items)]
    except Exception as error:  # noqa: BLE001 - anything but out-of-memory is re-raised unchanged
        if not is_out_of_memory(error):
            raise
    # retried outside the except block so the failed attempt's tensors (held by the traceback) are freed first
    if len(items) == 1:
        raise GenerationError(on_exhausted())
    half = (len(items) + 1) // 2
    on_retry(len(items), half)
    return (run_in_sub_batches(run, items[:half], on_retry, on_exhausted)
            + run_in_sub_batches(run, items[half:], on_retry, on_exhausted))


def nan_latents_advice(dtype: torch.dtype) -> str:
    """What helps when sampling made NaN/inf: more precision, unless the run already had it."""
    if dtype == torch.float16:
        return ("sampling produced NaN/inf latents in float16: run with --precision full (or --bf16 on hardware that "
                "has it)")
    return (f"sampling produced NaN/inf latents in {str(dtype).replace('torch.', '')}, so precision is not the cause: "
            f"the checkpoint, --vae, --lora or --embeddings file may be damaged, or --scale too large; try without "
            f"them, or a --scale below 15")


def first_stage_dtype(model: torch.nn.Module) -> torch.dtype:
    return next(model.first_stage_model.parameters()).dtype


def decode_to_pixels(model: torch.nn.Module, latents: torch.Tensor,
                     note: Callable[[str], None]) -> np.ndarray:
    """Latents to uint8 images [B, H, W, 3] (the caller reports any that are still entirely black).

    A half-precision autoencoder can overflow to NaN (saved as black): then the autoencoder moves to fp32 for the
    rest of the run and the batch is decoded again. NaN latents, or NaN even in fp32, raise GenerationError.
    """
    if not torch.isfinite(latents).all():
        raise GenerationError(nan_latents_advice(latents.dtype))
    decoded = model.decode_first_stage(latents.to(first_stage_dtype(model)))
    pixels = to_uint8(decoded)
    broken = _broken(decoded, pixels)
    if any(broken) and first_stage_dtype(model) != torch.float32:
        note("the half-precision autoencoder gave NaN/black images: decoding again in fp32 (and from now on)")
        model.first_stage_model.float()
        decoded = model.decode_first_stage(latents.float())
        pixels = to_uint8(decoded)
    if not torch.isfinite(decoded).all():
        raise GenerationError("the autoencoder produced NaN even in fp32: the checkpoint or --vae file may be "
                              "damaged; try another --vae")
    return pixels


def black_images(pixels: np.ndarray) -> list[bool]:
    """Per uint8 image [H, W, 3], whether every pixel is 0."""
    return (pixels.reshape(len(pixels), -1).max(axis=1) == 0).tolist()


def _broken(decoded: torch.Tensor, pixels: np.ndarray) -> list[bool]:
    """Per image: NaN/inf anywhere in the decode, or nothing but black."""
    finite = torch.isfinite(decoded.float()).flatten(1).all(dim=1).tolist()
    return [not ok or dark for ok, dark in zip(finite, black_images(pixels))]
