"""Reading checkpoint files safely: Lightning `.ckpt`, bare state dicts and `.safetensors`, told apart by their bytes.

Pickles are only ever opened with `torch.load(weights_only=True)`; a file that would run code is refused and its
payload never runs. The few harmless non-tensor objects that released Lightning checkpoints carry (a ModelCheckpoint
callback record, numpy scalars) are allowed by name and rebuilt as inert stand-ins.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import mmap
import os
import pickle
import re
import sys
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

SAFETENSORS, TORCH_ZIP, TORCH_LEGACY = "safetensors", "torch-zip", "torch-legacy"
# safetensors dtype names (https://github.com/huggingface/safetensors, format section)
SAFETENSORS_DTYPES = {name: getattr(torch, attribute) for name, attribute in (
    ("F64", "float64"), ("F32", "float32"), ("F16", "float16"), ("BF16", "bfloat16"), ("I64", "int64"),
    ("I32", "int32"), ("I16", "int16"), ("I8", "int8"), ("U8", "uint8"), ("U16", "uint16"), ("U32", "uint32"),
    ("U64", "uint64"), ("BOOL", "bool"),
    ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")) if hasattr(torch, attribute)}


# how torch's weights-only unpickler names a global it refused ("Unsupported global: GLOBAL posix.system ...")
UNSAFE_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
# the safetensors library's bound on the JSON header (safetensors/src/tensor.rs, MAX_HEADER_SIZE)
MAX_SAFETENSORS_HEADER = 100_000_000


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
    if len(head) == 9 and head[8:9] == b"{":
        length = int.from_bytes(head[:8], "little")
        if length + 8 > size:
            raise CheckpointError(f"cannot read {path}: its safetensors header claims {length} bytes but the file "
                                  f"holds {size} (is the file complete?)")
        return SAFETENSORS
    if head[:1] == b"\x80":  # pickle protocol opcode: torch's pre-1.6 format
        return TORCH_LEGACY
    raise CheckpointError(f"{path} is not a checkpoint: expected a .ckpt/.pt (PyTorch) or .safetensors file")


def _refusal(path: str | os.PathLike, error: Exception) -> CheckpointError:
    """Why the weights-only unpickler stopped: globals that could run code (named), else a damaged pickle."""
    try:
        names = set(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # the listing is only for the message (legacy files have none); the refusal stands either way
        names = set()
    names.update(UNSAFE_GLOBAL.findall(str(error)))
    if not names:
        # torch's message: a paragraph on weights_only, then "WeightsUnpickler error: <what stopped it>"
        _, _, detail = str(error).partition("WeightsUnpickler error:")
        detail = next((line.strip() for line in detail.splitlines() if line.strip()), type(error).__name__)
        return CheckpointError(f"cannot read {path}: its pickle is damaged or holds something other than weights "
                               f"({detail[:120]}); is the file complete?")
    return CheckpointError(
        f"refusing to load {path}: it contains pickled objects that could run code ({', '.join(sorted(names)[:5])}). "
        f"Only weights are read from checkpoints; if you trust the file, convert it to .safetensors with the tool "
        f"that made it")


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
    except Exception as error:  # noqa: BLE001 - a crafted or cut pickle fails in many ways (EOFError, IndexError,
        # RuntimeError from the zip reader, MemoryError for a storage larger than memory); all mean a bad file
        reason = next((line for line in str(error).splitlines() if line.strip()), "")
        reason = reason.split(". ")[0] or ("the file ends early" if isinstance(error, EOFError) else
                                           type(error).__name__)
        raise CheckpointError(f"cannot read {path}: {reason[:200]} (is the file complete?)") from None


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


def _safetensors_header(handle: Any, path: str | os.PathLike, size: int) -> tuple[dict[str, Any], int]:
    """The header's tensor entries and the offset where tensor data starts. The safetensors library validates the
    header (offsets sorted, contiguous, covering the data exactly; shapes and dtypes that fit them; plain JSON of
    bounded size and depth), so a file it refuses is refused here too; a cut file is named as such first."""
    length = int.from_bytes(handle.read(8), "little")
    if length > MAX_SAFETENSORS_HEADER:
        raise CheckpointError(f"cannot read {path}: its safetensors header claims {length} bytes, more than the "
                              f"{MAX_SAFETENSORS_HEADER} the format allows; the file is damaged")
    try:
        header = json.loads(handle.read(length))
    except RecursionError:
        raise CheckpointError(f"cannot read {path}: its safetensors header nests too deeply; the file is damaged or "
                              "crafted") from None
    except (UnicodeDecodeError, ValueError) as error:
        raise CheckpointError(f"cannot read {path}: its safetensors header is damaged ({error}); "
                              "is the file complete?") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"cannot read {path}: its safetensors header is a {type(header).__name__}, not a map "
                              "of tensors; the file is damaged")
    data_start = 8 + length
    for key, entry in header.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) and key != "__metadata__" else None
        if (isinstance(offsets, list) and len(offsets) == 2 and all(type(end) is int for end in offsets)
                and data_start + max(offsets) > size):
            raise CheckpointError(f"cannot read {path}: tensor {key} lies outside the file (is the file complete?)")
    _validate_safetensors(path)
    header.pop("__metadata__", None)
    for key, entry in header.items():
        if entry["dtype"] not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {key} has dtype {entry['dtype']}, which this PyTorch cannot hold")
    return header, data_start


def _validate_safetensors(path: str | os.PathLike) -> None:
    """CheckpointError with the safetensors library's reason when it refuses the file's header."""
    from safetensors import safe_open

    try:
        with safe_open(os.fspath(path), framework="numpy"):  # parses and validates the header; reads no tensor
            pass
    except Exception as error:  # noqa: BLE001 - SafetensorError, and OSError for a file that cannot be mapped
        reason = str(error).splitlines()[0] if str(error).strip() else type(error).__name__
        reason = reason.removeprefix("Error while deserializing header: ")
        raise CheckpointError(f"cannot read {path}: the safetensors library refuses its header ({reason[:200]}); "
                              "the file is damaged or crafted") from None


def _map_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Every tensor of a .safetensors file as a view of one private (copy-on-write) memory map of it: nothing is
    read until used, and pages already read are shared with the OS file cache."""
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        header, data_start = _safetensors_header(handle, path, size)
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_COPY)
    whole = torch.frombuffer(mapped, dtype=torch.uint8)  # holds a reference to the map, which lives as long as it
    tensors = {}
    for key, entry in header.items():
        dtype = SAFETENSORS_DTYPES[entry["dtype"]]
        begin, end = entry["data_offsets"]
        raw = whole[data_start + begin:data_start + end]
        if (data_start + begin) % dtype.itemsize:
            raw = raw.clone()  # a view must start at a multiple of its element size; writers normally align
        tensors[key] = raw.view(dtype).view(entry["shape"])
    return tensors


def read_checkpoint(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state_dict, extras) of a checkpoint on the CPU; .ckpt zip files and .safetensors are memory-mapped."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    file_format = detect_format(path)
    if file_format == SAFETENSORS:
        try:
            return _map_safetensors(path), {}
        except (KeyError, TypeError, ValueError, OSError) as error:
            raise CheckpointError(f"cannot read {path}: {error} (is the file complete?)") from None
    obj = _torch_load(path, file_format)
    try:
        return unwrap_state_dict(obj)
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from None


def read_object(path: str | os.PathLike) -> Any:
    """The file's whole object, read as safely as `read_checkpoint` reads it but not unwrapped: for files whose
    tensors sit below the top level (A1111's textual-inversion `.pt`). A .safetensors file gives its tensor dict."""
    if not os.path.isfile(path) or detect_format(path) == SAFETENSORS:
        return read_checkpoint(path)[0]
    return _torch_load(path, detect_format(path))


def read_tensors(path: str | os.PathLike, shapes_only: bool = False) -> dict[str, torch.Tensor]:
    """The file's tensors; with `shapes_only`, meta tensors of their shapes and dtypes (only its layout is read)."""
    if shapes_only:
        return {key: torch.empty(shape, dtype=dtype, device="meta")
                for key, (shape, dtype) in read_layout(path).items()}
    return read_checkpoint(path)[0]


def read_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Key -> shape without reading tensor data (safetensors header; a memory-mapped .ckpt). Remembered per file
    version, since a run asks several times (config choice, fit checks) before it loads."""
    return {key: shape for key, (shape, _) in read_layout(path).items()}


def read_layout(path: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Key -> (shape, dtype) without reading tensor data, as `read_shapes`."""
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    stat = os.stat(path)
    return dict(_read_layout(os.path.realpath(path), stat.st_size, stat.st_mtime_ns))


@functools.lru_cache(maxsize=8)
def _read_layout(path: str, size: int, mtime_ns: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    if detect_format(path) == SAFETENSORS:
        with open(path, "rb") as handle:
            try:
                header, _ = _safetensors_header(handle, path, os.path.getsize(path))
            except (KeyError, TypeError, ValueError) as error:
                raise CheckpointError(f"cannot read {path}: {error} (is the file complete?)") from None
        return {key: (tuple(entry["shape"]), SAFETENSORS_DTYPES[entry["dtype"]]) for key, entry in header.items()}
    state_dict, _ = read_checkpoint(path)
    return {key: (tuple(value.shape), value.dtype) for key, value in state_dict.items()}


def _file_mapped_ranges() -> list[tuple[int, int]]:
    """Address ranges of this process mapped from regular files (Linux /proc/self/maps; empty elsewhere)."""
    try:
        with open("/proc/self/maps") as maps:
            lines = maps.readlines()
    except OSError:
        return []
    ranges = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].startswith("/"):
            start, end = fields[0].split("-")
            ranges.append((int(start, 16), int(end, 16)))
    return ranges


class PageReleaser:
    """Gives back the memory-mapped checkpoint pages of tensors whose values now live elsewhere.

    Converting a mapped checkpoint (fp16 file -> fp32 model, or to another device) or repacking its weights reads
    every page, and those pages count towards the process's memory until the whole map is dropped. The pages wholly
    inside a tensor are returned with madvise(MADV_DONTNEED) if the kernel reports them as unmodified file pages
    (/proc/self/pagemap): touching them again re-reads the same bytes from the file. Pages written to since the file
    was mapped (a weight changed in place) are private copies and are always kept. Where Linux's /proc is not
    available this does nothing.
    """

    def __init__(self) -> None:
        self._ranges = []
        self._madvise = self._pagemap = None
        if sys.platform.startswith("linux") and hasattr(mmap, "MADV_DONTNEED"):
            try:
                self._pagemap = open("/proc/self/pagemap", "rb", buffering=0)
                self._madvise = ctypes.CDLL(None, use_errno=True).madvise
                self._madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
                self._ranges = _file_mapped_ranges()
            except (OSError, AttributeError):
                self._ranges = []
        self._page = mmap.PAGESIZE

    def __del__(self) -> None:
        if self._pagemap is not None:
            self._pagemap.close()

    def release(self, tensor: torch.Tensor) -> None:
        if not self._ranges or tensor.device.type != "cpu" or not tensor.is_contiguous():
            return
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        first, last = -(-start // self._page) * self._page, end // self._page * self._page
        if last <= first or not any(low <= first and last <= high for low, high in self._ranges):
            return
        self._pagemap.seek(first // self._page * 8)
        entries = np.frombuffer(self._pagemap.read((last - first) // self._page * 8), dtype=np.uint64)
        # bit 63: present; bit 61: a file page (not a private copy made by a write)
        clean = ((entries >> np.uint64(63)) & np.uint64(1)).astype(bool) & \
            ((entries >> np.uint64(61)) & np.uint64(1)).astype(bool)
        edges = np.flatnonzero(np.diff(np.concatenate([[False], clean, [False]]).astype(np.int8)))
        for run_start, run_end in zip(edges[::2], edges[1::2]):
            self._madvise(first + int(run_start) * self._page, int(run_end - run_start) * self._page,
                          mmap.MADV_DONTNEED)


def _cache_file() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "latent-diffusion" / "model-hashes.json"


def file_sha256(path: str | os.PathLike, tensor_data_only: bool = False) -> str:
    """The SHA-256 (hex) of the file, or with `tensor_data_only` of a .safetensors file's bytes after its header
    (the "addnet" hash AUTOMATIC1111 gives LoRA files); cached by path, size and mtime."""
    stat = os.stat(path)
    key = f"{os.path.abspath(path)}|{stat.st_size}|{stat.st_mtime_ns}|{'data' if tensor_data_only else 'file'}"
    cache_path = _cache_file()
    try:
        cache = json.loads(cache_path.read_text())
    except (OSError, ValueError, RecursionError):
        cache = {}
    if not isinstance(cache, dict):
        cache = {}
    if isinstance(cache.get(key), str) and len(cache[key]) == 64:
        return cache[key]
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        if tensor_data_only:
            handle.seek(8 + int.from_bytes(handle.read(8), "little"))
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    cache[key] = digest.hexdigest()
    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        temporary = cache_path.with_suffix(f".{os.getpid()}.tmp")
        temporary.write_text(json.dumps(cache))
        os.replace(temporary, cache_path)
    except OSError:  # a read-only home only costs hashing again next time
        pass
    return cache[key]


def model_hash(path: str | os.PathLike) -> str:
    """First 10 hex digits of the file's SHA-256 (the "Model hash" other tools print)."""
    return file_sha256(path)[:10]


def lora_hash(path: str | os.PathLike) -> str:
    """AUTOMATIC1111's 12-hex shorthash of a LoRA file (its "Lora hashes"): of the tensor data for .safetensors (the
    "addnet" hash), of the whole file otherwise."""
    return file_sha256(path, tensor_data_only=str(path).lower().endswith(".safetensors"))[:12]


def embedding_hash(path: str | os.PathLike) -> str:
    """AUTOMATIC1111's 12-hex shorthash of a textual-inversion file (its "TI hashes"): of the whole file."""
    return file_sha256(path)[:12]
