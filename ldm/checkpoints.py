"""Reading checkpoint files safely: Lightning `.ckpt`, bare state dicts and `.safetensors`, told apart by their bytes.

Pickles are only ever opened with `torch.load(weights_only=True)`; a file that would run code is refused and its
payload never runs. The few harmless non-tensor objects that released Lightning checkpoints carry (a ModelCheckpoint
callback record, numpy scalars) are allowed by name and rebuilt as inert stand-ins.
"""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import zipfile
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

SAFETENSORS, TORCH_ZIP, TORCH_LEGACY = "safetensors", "torch-zip", "torch-legacy"


class CheckpointError(Exception):
    """A checkpoint file that cannot be used; the message says why and what to do."""


class LightningCallbackRecord(dict):
    """Inert stand-in for the `ModelCheckpoint` class that old Lightning pickles name as a dict key."""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, dict):
            self.update(state)


def _allowed_globals() -> list:
    numpy_core = getattr(np, "_core", None) or np.core
    allowed: list = [
        (LightningCallbackRecord, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
        (LightningCallbackRecord, "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint"),
        (numpy_core.multiarray.scalar, "numpy.core.multiarray.scalar"),
        numpy_core.multiarray.scalar,
        np.dtype,
    ]
    allowed += [type(np.dtype(code)) for code in ("f2", "f4", "f8", "i4", "i8", "u1", "b1")]
    return allowed


def detect_format(path: str | os.PathLike) -> str:
    """SAFETENSORS, TORCH_ZIP or TORCH_LEGACY, from the first bytes of the file (never from its extension)."""
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        head = handle.read(9)
    if head[:4] == b"PK\x03\x04":
        return TORCH_ZIP
    if len(head) == 9 and int.from_bytes(head[:8], "little") + 8 <= size and head[8:9] == b"{":
        return SAFETENSORS
    if head[:1] == b"\x80":  # pickle protocol opcode: torch's pre-1.6 format
        return TORCH_LEGACY
    raise CheckpointError(f"{path} is not a checkpoint: expected a .ckpt/.pt (PyTorch) or .safetensors file")


def _refusal(path: str | os.PathLike, error: Exception) -> CheckpointError:
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # the listing is only for the message; the refusal stands either way
        names = []
    named = f" ({', '.join(sorted(names)[:5])})" if names else ""
    return CheckpointError(
        f"refusing to load {path}: it contains pickled objects that could run code{named}. Only weights are read "
        f"from checkpoints; if you trust the file, convert it to .safetensors with the tool that made it")


def _torch_load(path: str | os.PathLike, file_format: str) -> Any:
    # torch.load routes "*.safetensors" names to safetensors whatever the bytes say: hand it a file object then
    misnamed = os.fspath(path).endswith(".safetensors")
    try:
        with torch.serialization.safe_globals(_allowed_globals()), \
                (open(path, "rb") if misnamed else nullcontext(path)) as source:
            return torch.load(source, map_location="cpu", weights_only=True,
                              mmap=file_format == TORCH_ZIP and not misnamed)
    except pickle.UnpicklingError as error:
        raise _refusal(path, error) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as error:
        raise CheckpointError(f"cannot read {path}: {str(error).splitlines()[0]} (is the file complete?)") from None


def unwrap_state_dict(obj: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensor dict inside a Lightning checkpoint (`state_dict`) or a bare one, and the other top-level entries."""
    extras: dict[str, Any] = {}
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        extras.update({key: value for key, value in obj.items() if key != "state_dict"})
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"expected a dict of tensors, found a {type(obj).__name__}")
    tensors = {key: value for key, value in obj.items() if torch.is_tensor(value)}
    extras.update({key: value for key, value in obj.items() if not torch.is_tensor(value)})
    if not tensors:
        raise CheckpointError("the file holds no tensors: it is not a model checkpoint")
    return tensors, extras


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict, extras) of a checkpoint on the CPU; .ckpt zip files and .safetensors are memory-mapped."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    file_format = detect_format(path)
    if file_format == SAFETENSORS:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            return load_file(str(path), device="cpu"), {}
        except (SafetensorError, OSError, ValueError) as error:
            raise CheckpointError(f"cannot read {path}: {error} (is the file complete?)") from None
    return unwrap_state_dict(_torch_load(path, file_format))


def read_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Key -> shape without reading tensor data (safetensors header; a memory-mapped .ckpt)."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    if detect_format(path) == SAFETENSORS:
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as handle:
            return {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    state_dict, _ = read_checkpoint(path)
    return {key: tuple(value.shape) for key, value in state_dict.items()}


def _cache_file() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "latent-diffusion" / "model-hashes.json"


def model_hash(path: str | os.PathLike) -> str:
    """First 10 hex digits of the file's SHA-256 (the "Model hash" other tools print), cached by path/size/mtime."""
    stat = os.stat(path)
    key = f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}"
    cache_path = _cache_file()
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError):
        cache = {}
    if key in cache:
        return cache[key]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    cache[key] = digest.hexdigest()[:10]
    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        temporary = cache_path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(cache))
        os.replace(temporary, cache_path)
    except OSError:  # a read-only home only costs hashing again next time
        pass
    return cache[key]
