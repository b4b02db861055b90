"""Writing weights in the released key layout: `.safetensors` files that `ldm.loading.load_model` reads as they are."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import torch

from ldm.loading import SCHEDULE_KEYS

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def cast_weights(state_dict: Mapping[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """Floating-point weights in `dtype`; the noise-schedule buffers stay float32 (samplers need their precision)."""
    if dtype not in DTYPES:
        raise ValueError(f"export dtype {dtype!r} is not one of {sorted(DTYPES)}")
    target = DTYPES[dtype]
    return {key: value.to(target) if value.is_floating_point() and key not in SCHEDULE_KEYS else value
            for key, value in state_dict.items()}


def save_safetensors(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike,
                     metadata: Mapping[str, str] | None = None) -> Path:
    """Write `state_dict` to `path` atomically (a reader never sees half a file); tensors are made contiguous."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in state_dict.items()}
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    save_file(tensors, str(temporary), metadata=dict(metadata or {}))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary, 0o666 & ~umask)  # safetensors creates files readable by their owner only
    os.replace(temporary, path)
    return path
