"""Choosing the device and the precision: the one place that names accelerator back-ends."""
from __future__ import annotations

import torch

PRECISIONS = {"full": torch.float32, "fp32": torch.float32, "autocast": torch.float16, "fp16": torch.float16,
              "bf16": torch.bfloat16}


def mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def choose_device(name: str | None = None) -> torch.device:
    """`name` ("cuda", "cuda:1", "mps", "cpu") or, when None/"auto", the best available: CUDA, then MPS, then CPU."""
    if name in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if mps_available() else torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"unknown device {name!r}: use cuda, cuda:N, mps or cpu") from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but this PyTorch sees no CUDA GPU: use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} requested but only {torch.cuda.device_count()} CUDA GPU(s) exist")
    elif device.type == "mps" and not mps_available():
        raise ValueError(f"device {name!r} requested but Apple MPS is not available here: use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"device {name!r} is not supported: use cuda, cuda:N, mps or cpu")
    return device


def choose_dtype(precision: str, device: torch.device) -> tuple[torch.dtype, str | None]:
    """The weight dtype for `precision` on `device`, and a note when the request had to be replaced.

    "autocast" (the CompVis default) and "fp16" mean half precision on accelerators. The CPU has no fast fp16 kernels
    and some ops lack them, so fp16 there becomes fp32 with a note; bf16 is kept (it is supported and faster).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}: use one of {', '.join(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    if dtype == torch.float16 and device.type == "cpu":
        return torch.float32, f"--precision {precision} (fp16) is not supported on the CPU: running in fp32"
    return dtype, None


def accelerator_memory(device: torch.device) -> tuple[int, int] | None:
    """(free, total) bytes of a CUDA device's memory, or None where there is no separate device memory to ask about
    (the CPU, and Apple's unified memory)."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    return int(free), int(total)
