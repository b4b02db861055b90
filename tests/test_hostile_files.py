"""Crafted files a user may download: checkpoints, configs, LoRAs and embeddings that try to run code, crash the reader
or exhaust the machine. Each is refused through the library's entry points (a CheckpointError / LoadError / LoraError
/ EmbeddingError naming the file and what is wrong) and through txt2img (exit status 2, one line on stderr, no
traceback, nothing written), and nothing in it ever runs: every payload would create the marker file.

The cases are tables (CHECKPOINTS, CONFIGS, LORAS, EMBEDDINGS); each row is one crafted file and the words its
refusal must contain. The safetensors rows are also checked against the safetensors library, whose rules the reader
follows. Last, the tokenizer: a 131k-character word in well under a second, with the reference's ids under the cap.
"""
from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import string
import struct
import subprocess
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file, save_file

from checkpoint_factory import TEST_CONFIGS, make_tiny_controlnet
from ldm.checkpoints import CheckpointError, read_checkpoint
from ldm.controlnet import load_controlnet
from ldm.loading import LoadError, check_loadable, instantiate_on_meta, load_config, load_model
from ldm.lora import LoraError, apply_lora, check_lora
from ldm.modules.encoders.clip_tokenizer import MAX_WORD_BYTES, CLIPTokenizer
from ldm.textual_inversion import EmbeddingError, check_textual_inversion, read_embeddings
from ldm.util import UntrustedTargetError, instantiate_from_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY_CONFIG = TEST_CONFIGS / "tiny-v1.yaml"
LAYER = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"  # a 32 x 32 projection of the tiny UNet
MARKER = "MARKER"  # file name every payload tries to create in the case folder


# ---------------------------------------------------------------------------------------------------------------- files
def safetensors_bytes(header: bytes | dict, data: bytes = b"", length: int | None = None) -> bytes:
    """A .safetensors file with this header (JSON text or a dict) and data; `length`: the header length to claim."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + data


def tensor_entry(shape: list, begin: int = 0, end: int = 8, dtype: str = "F32") -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def nested(depth: int, leaf: str = "1") -> bytes:
    return ("[" * depth + leaf + "]" * depth).encode()


class OpenFile:
    """Unpickling this would create the marker by opening it for writing."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


class SystemCall:
    """Unpickling this would run a shell command that creates the marker."""

    def __init__(self, marker: Path):
        self.command = f"touch {marker}"

    def __reduce__(self):
        return (os.system, (self.command,))


class Evaluation:
    def __init__(self, marker: Path):
        self.source = f"open({str(marker)!r}, 'w')"

    def __reduce__(self):
        return (eval, (self.source,))


class Process:
    def __init__(self, marker: Path):
        self.args = ["touch", str(marker)]

    def __reduce__(self):
        return (subprocess.Popen, (self.args,))


def legacy_pickle(obj) -> bytes:
    """A raw pickle, as torch's pre-1.6 format starts (Python 3 module names)."""
    return pickle.dumps(obj, protocol=2, fix_imports=False)


def saved(obj, path: Path) -> Path:
    torch.save(obj, path)
    return path


def zip_checkpoint(folder: Path, data_pkl: bytes | None = None, storage_bytes: int | None = None) -> bytes:
    """A real torch zip checkpoint whose data.pkl is replaced, or whose tensor storages are cut to `storage_bytes`."""
    path = folder / "zip_source.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(200)}}, path)
    out = folder / "zip_rewritten.ckpt"
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as target:
        for info in source.infolist():
            payload = source.read(info.filename)
            if data_pkl is not None and info.filename.endswith("/data.pkl"):
                payload = data_pkl
            if storage_bytes is not None and "/data/" in info.filename:
                payload = payload[:storage_bytes]
            target.writestr(info, payload)
    return out.read_bytes()


def deep_list_pickle(depth: int) -> bytes:
    """A pickle of `depth` nested lists (EMPTY_LIST `depth` times, then APPEND each into the one below)."""
    return b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b"."


def global_call_pickle(module: str, name: str, argument: str) -> bytes:
    """A hand-written pickle that calls module.name(argument): GLOBAL, the argument, TUPLE1, REDUCE, STOP."""
    text = argument.encode()
    return (b"\x80\x02c" + f"{module}\n{name}\n".encode() + b"X" + struct.pack("<I", len(text)) + text
            + b"\x85R.")


def tiny_state(tiny_checkpoints) -> dict[str, torch.Tensor]:
    return load_file(str(tiny_checkpoints["v1", ".safetensors"]))


def with_one_weight(state: dict, dtype: torch.dtype) -> dict:
    key = "model.diffusion_model.out.2.weight"
    changed = dict(state)
    changed[key] = torch.ones(state[key].shape, dtype=dtype)
    return changed


def write_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def write_tensors(path: Path, tensors: dict) -> Path:
    save_file({key: value.contiguous() for key, value in tensors.items()}, str(path))
    return path


F32 = b"\x00" * 8  # data for one [2] float32 tensor

# name -> (writer(folder, marker, tiny state) -> path, words the refusal says). Each is passed as --ckpt.
CHECKPOINTS = {
    "legacy pickle calling os.system": (
        lambda f, m, s: write_bytes(f / "system.ckpt", legacy_pickle({"state_dict": SystemCall(m)})),
        "could run code (posix.system)"),
    "legacy pickle calling builtins.eval": (
        lambda f, m, s: write_bytes(f / "eval.ckpt", legacy_pickle(Evaluation(m))), "could run code (eval)"),
    "legacy pickle starting subprocess.Popen": (
        lambda f, m, s: write_bytes(f / "popen.ckpt", legacy_pickle([Process(m)])), "could run code (subprocess.Popen"),
    "zip .ckpt with a __reduce__ payload": (
        lambda f, m, s: saved({"state_dict": {"w": torch.zeros(2)}, "x": OpenFile(m)}, f / "reduce.ckpt"),
        "could run code (io.open)"),
    "zip .ckpt whose data.pkl calls posix.system": (
        lambda f, m, s: write_bytes(f / "global.ckpt", zip_checkpoint(f, global_call_pickle("posix", "system",
                                                                                             f"touch {m}"))),
        "could run code (posix.system)"),
    "zip .ckpt cut in half": (
        lambda f, m, s: write_bytes(f / "cut.ckpt", zip_checkpoint(f)[:700]), "is the file complete?"),
    "legacy pickle cut short": (
        lambda f, m, s: write_bytes(f / "cut_legacy.ckpt", legacy_pickle({"state_dict": {}})[:-3]),
        "is the file complete?"),
    "zip .ckpt with a garbage data.pkl": (
        lambda f, m, s: write_bytes(f / "garbage.ckpt", zip_checkpoint(f, b"\x80\x02garbage, not a pickle")),
        "its pickle is damaged or holds something other than weights"),
    "zip .ckpt whose storage is shorter than declared": (
        lambda f, m, s: write_bytes(f / "short_storage.ckpt", zip_checkpoint(f, storage_bytes=10)),
        "is the file complete?"),
    "zip .ckpt with 100,000 nested lists": (
        lambda f, m, s: write_bytes(f / "deep.ckpt", zip_checkpoint(f, deep_list_pickle(100_000))),
        "expected a dict of tensors, found a list"),
    "safetensors with overlapping data_offsets": (
        lambda f, m, s: write_bytes(f / "overlap.safetensors", safetensors_bytes(
            {"a": tensor_entry([2]), "b": tensor_entry([2])}, F32)), "invalid offset for tensor"),
    "safetensors with a gap before its data": (
        lambda f, m, s: write_bytes(f / "gap.safetensors", safetensors_bytes(
            {"a": tensor_entry([1], 4, 8)}, F32)), "invalid offset for tensor"),
    "safetensors whose offsets point past the file": (
        lambda f, m, s: write_bytes(f / "outside.safetensors", safetensors_bytes(
            {"a": tensor_entry([1000], 0, 4000)}, F32)), "lies outside the file"),
    "safetensors with bytes after its tensors": (
        lambda f, m, s: write_bytes(f / "trailing.safetensors", safetensors_bytes(
            {"a": tensor_entry([1], 0, 4)}, F32)), "file not fully covered"),
    "safetensors with a negative shape": (
        lambda f, m, s: write_bytes(f / "negative.safetensors", safetensors_bytes(
            {"a": tensor_entry([-1, -2])}, F32)), "invalid value: integer `-1`"),
    "safetensors with a shape whose size overflows": (
        lambda f, m, s: write_bytes(f / "overflow.safetensors", safetensors_bytes(
            {"a": tensor_entry([2**32, 2**32, 2**32])}, F32)), "overflow"),
    "safetensors with a 10**400 dimension": (
        lambda f, m, s: write_bytes(f / "bigint.safetensors", safetensors_bytes(
            b'{"a": {"dtype": "F32", "shape": [1' + b"0" * 400 + b'], "data_offsets": [0, 8]}}', F32)),
        "number out of range"),
    "safetensors with a float shape": (
        lambda f, m, s: write_bytes(f / "float_shape.safetensors", safetensors_bytes(
            b'{"a": {"dtype": "F32", "shape": [2.0], "data_offsets": [0, 8]}}', F32)), "floating point"),
    "safetensors with an unknown dtype": (
        lambda f, m, s: write_bytes(f / "dtype.safetensors", safetensors_bytes(
            {"a": tensor_entry([2], dtype="Q99")}, F32)), "unknown variant `Q99`"),
    "safetensors header nested 100,000 deep": (
        lambda f, m, s: write_bytes(f / "deep_header.safetensors", safetensors_bytes(
            b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": ' + nested(100_000) + b"}}", F32)),
        "nests too deeply"),
    "safetensors header nested 200 deep (past the library's limit)": (
        lambda f, m, s: write_bytes(f / "deep200.safetensors", safetensors_bytes(
            b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "x": ' + nested(200) + b"}}", F32)),
        "recursion limit exceeded"),
    "safetensors metadata holding a JSON object": (
        lambda f, m, s: write_bytes(f / "meta_object.safetensors", safetensors_bytes(
            {"__metadata__": {"ss_tags": {"a": 1}}, "a": tensor_entry([2])}, F32)), "expected a string"),
    "safetensors metadata holding 10**400": (
        lambda f, m, s: write_bytes(f / "meta_bigint.safetensors", safetensors_bytes(
            b'{"__metadata__": {"n": 1' + b"0" * 400 + b'}, "a": {"dtype": "F32", "shape": [2], '
            b'"data_offsets": [0, 8]}}', F32)), "number out of range"),
    "safetensors metadata nested 100,000 deep": (
        lambda f, m, s: write_bytes(f / "meta_deep.safetensors", safetensors_bytes(
            b'{"__metadata__": {"n": ' + nested(100_000, '"x"') + b'}, "a": {"dtype": "F32", "shape": [2], '
            b'"data_offsets": [0, 8]}}', F32)), "nests too deeply"),
    "safetensors header that is not UTF-8": (
        lambda f, m, s: write_bytes(f / "latin1.safetensors", safetensors_bytes(b'{"\xff": 1}', F32)),
        "header is damaged"),
    "safetensors header length larger than the file": (
        lambda f, m, s: write_bytes(f / "long_header.safetensors", safetensors_bytes(b"{}", length=10**9)),
        "header claims 1000000000 bytes but the file holds 10"),
    "zero-length file": (lambda f, m, s: write_bytes(f / "empty.safetensors", b""), "is not a checkpoint"),
    "checkpoint with an int64 weight where floats belong": (
        lambda f, m, s: write_tensors(f / "int_weight.safetensors", with_one_weight(s, torch.int64)),
        "of another kind of number (model.diffusion_model.out.2.weight torch.int64 vs torch.float32)"),
    "checkpoint with a bool weight where floats belong": (
        lambda f, m, s: write_tensors(f / "bool_weight.safetensors", with_one_weight(s, torch.bool)),
        "of another kind of number (model.diffusion_model.out.2.weight torch.bool"),
}

# name -> (dotted key to set in tiny-v1.yaml or a whole yaml text, value, words). {marker} is the marker's path.
CONFIGS = {
    "model target subprocess.run": (
        "model", {"target": "subprocess.run", "params": {"args": ["touch", "{marker}"]}},
        "config target 'subprocess.run' is outside this project"),
    "model target os.system": (
        "model", {"target": "os.system", "params": {"command": "touch {marker}"}},
        "config target 'os.system' is outside this project"),
    "nested unet target builtins.open": (
        "model.params.unet_config", {"target": "builtins.open", "params": {"file": "{marker}", "mode": "w"}},
        "config target 'builtins.open' is outside this project"),
    "nested text encoder target builtins.exec": (
        "model.params.cond_stage_config", {"target": "builtins.exec", "params": {"source": "open('{marker}', 'w')"}},
        "config target 'builtins.exec' is outside this project"),
    "a foreign class re-exported by a project module": (
        "model.params.first_stage_config.target", "ldm.loading.Path",
        "'ldm.loading.Path' is pathlib.Path, not a class defined in this project"),
    "a project function, not a class": (
        "model", {"target": "ldm.cli.txt2img.main", "params": {"argv": ["--outdir", "{marker}"]}},
        "'ldm.cli.txt2img.main' is a function, not a class defined in this project"),
    "a module reached through a project module": (
        "model.target", "ldm.util.importlib.import_module", "cannot be imported"),
    "a project package's builtins": ("model.target", "ldm.__builtins__", "is a dict, not a class"),
    "a target that is a list": ("model.target", ["os", "system"], "is not a dotted path"),
    "params that are a list": ("model.params", [1, 2], "model.params is a ListConfig, not a mapping"),
    "a 10**400 channel count": (
        "model.params.unet_config.params.model_channels", "BIGINT",
        "config value params.unet_config.params.model_channels is a 401-digit number, beyond the 65536"),
    "a noise schedule of 10**8 steps (gigabytes of buffers)": (
        "model.params.timesteps", 100_000_000, "config value params.timesteps is 100000000, beyond the 65536"),
    "a negative channel count": (
        "model.params.unet_config.params.model_channels", -32, "cannot build its model"),
    "an OmegaConf interpolation doubling 40 times": (
        "INTERPOLATION_BOMB", None, "uses an OmegaConf interpolation"),
    "an environment variable read through oc.env": (
        "model.params.unet_config.params.model_channels", "${oc.env:HOME}", "uses an OmegaConf interpolation"),
    "yaml aliases nested 9 levels (billion laughs)": ("ALIAS_BOMB", None, "cannot read config"),
    "yaml nested 100,000 levels": ("DEEP_YAML", None, "cannot read config"),
}

# name -> (tensors of a kohya LoRA for LAYER (or a writer(folder, marker)), words)
LORA_DOWN, LORA_UP = f"{LAYER}.lora_down.weight", f"{LAYER}.lora_up.weight"


def lora(down=None, up=None, alpha=torch.tensor(1.0)) -> dict:
    tensors = {LORA_DOWN: torch.randn(2, 32) if down is None else down,
               LORA_UP: torch.randn(32, 2) if up is None else up}
    if alpha is not None:
        tensors[f"{LAYER}.alpha"] = alpha
    return tensors


LORAS = {
    "alpha that is a vector": (lora(alpha=torch.ones(4)), "alpha is [4] torch.float32, not one number"),
    "alpha that is NaN": (lora(alpha=torch.tensor(float("nan"))), "alpha is nan, not a finite number"),
    "alpha that is infinite": (lora(alpha=torch.tensor(float("inf"))), "alpha is inf, not a finite number"),
    "alpha that is a bool": (lora(alpha=torch.tensor(True)), "not one number"),
    "up and down of different ranks": (lora(up=torch.randn(32, 3)), "lora_up has rank 3 but lora_down rank 2"),
    "rank zero": (lora(down=torch.zeros(0, 32), up=torch.zeros(32, 0)), "not a non-empty matrix"),
    "a one-dimensional down": (lora(down=torch.randn(64)), "has shape [64], not a non-empty matrix"),
    "integer weights": (lora(down=torch.ones(2, 32, dtype=torch.int64)), "holds torch.int64 numbers"),
    "NaN weights": (lora(up=torch.full((32, 2), float("nan"))), "holds NaN or infinite weights"),
    "weights whose product overflows": (
        lora(down=torch.full((2, 32), 1e30), up=torch.full((32, 2), 1e30)), "hold NaN or infinite values"),
    "a pickled LoRA calling os.system": (
        lambda f, m: write_bytes(f / "system_lora.pt", legacy_pickle({LORA_DOWN: SystemCall(m)})),
        "could run code (posix.system)"),
    "a LoRA with overlapping offsets": (
        lambda f, m: write_bytes(f / "overlap_lora.safetensors", safetensors_bytes(
            {LORA_DOWN: tensor_entry([2]), LORA_UP: tensor_entry([2])}, F32)), "invalid offset for tensor"),
    "kohya metadata holding a nested object": (
        lambda f, m: write_bytes(f / "meta_lora.safetensors", safetensors_bytes(
            {"__metadata__": {"ss_tag_frequency": {"a": {"b": 1}}}, LORA_DOWN: tensor_entry([2])}, F32)),
        "expected a string"),
}

# name -> (writer(folder, marker) -> path, words)
EMBEDDINGS = {
    "vectors of the wrong width": (
        lambda f, m: write_tensors(f / "wide.safetensors", {"emb_params": torch.randn(1, 48)}), "48 wide"),
    "a NaN vector": (
        lambda f, m: write_tensors(f / "nan.safetensors", {"emb_params": torch.full((1, 32), float("nan"))}),
        "holds NaN or infinite values"),
    "an infinite vector": (
        lambda f, m: saved({"string_to_param": {"*": torch.full((1, 32), float("inf"))}}, f / "inf.pt"),
        "holds NaN or infinite values"),
    "integer vectors": (
        lambda f, m: write_tensors(f / "int.safetensors", {"emb_params": torch.ones(1, 32, dtype=torch.int32)}),
        "holds torch.int32 numbers"),
    "bool vectors": (
        lambda f, m: write_tensors(f / "bool.safetensors", {"emb_params": torch.ones(1, 32, dtype=torch.bool)}),
        "holds torch.bool numbers"),
    "a three-dimensional tensor": (
        lambda f, m: write_tensors(f / "cube.safetensors", {"emb_params": torch.randn(2, 2, 32)}),
        "is [2, 2, 32], not a [vectors, width] tensor"),
    "a tiny storage viewed as a billion half floats": (
        lambda f, m: saved({"string_to_param": {"*": torch.zeros(1, dtype=torch.half).expand(1, 10**9)}},
                           f / "expanded.pt"), "an embedding has at most 75 vectors"),
    "a .pt with a __reduce__ payload": (
        lambda f, m: saved({"string_to_param": {"*": OpenFile(m)}}, f / "reduce.pt"), "could run code (io.open)"),
    "a legacy .pt calling os.system": (
        lambda f, m: write_bytes(f / "system.pt", legacy_pickle({"string_to_param": SystemCall(m)})),
        "could run code (posix.system)"),
    "string_to_param nested 100,000 dicts deep": (
        lambda f, m: write_bytes(f / "deep_dict.pt", zip_checkpoint(f, deep_dict_pickle(100_000))),
        "is dict, not a [vectors, width] tensor"),
    "an embedding with overlapping offsets": (
        lambda f, m: write_bytes(f / "overlap_emb.safetensors", safetensors_bytes(
            {"emb_params": tensor_entry([2]), "x": tensor_entry([2])}, F32)), "invalid offset for tensor"),
    "a folder whose only link points back at itself": (lambda f, m: looping_folder(f), "holds no embedding files"),
}


def deep_dict_pickle(depth: int) -> bytes:
    """{"string_to_param": {"*": {"*": ... {}}}} nested `depth` dicts deep, written opcode by opcode (pickle itself
    would recurse): EMPTY_DICT and a key per level, then SETITEM from the innermost out."""
    def key(text: str) -> bytes:
        return b"X" + struct.pack("<I", len(text)) + text.encode()
    return (b"\x80\x02}" + key("string_to_param") + (b"}" + key("*")) * depth + b"}" + b"s" * (depth + 1) + b".")


def looping_folder(folder: Path) -> Path:
    loop = folder / "loop"
    loop.mkdir()
    (loop / "self").symlink_to(loop, target_is_directory=True)
    return loop


# ------------------------------------------------------------------------------------------------------- fixtures
@pytest.fixture
def case_folder(tmp_path) -> tuple[Path, Path]:
    """(folder for the crafted file, the marker path its payload would create)."""
    folder = tmp_path / "case"
    folder.mkdir()
    return folder, folder / MARKER


@pytest.fixture
def cli(tmp_path, capsys, monkeypatch):
    """cli(*flags) -> (status, stderr lines): txt2img in-process at 32x32 with 2 steps, checking afterwards that the
    outdir holds no file."""
    from ldm.cli.txt2img import main

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    outdir = tmp_path / "out"

    def run(*flags):
        status = main(["--H", "32", "--W", "32", "--ddim_steps", "2", "--n_samples", "1", "--n_iter", "1",
                       "--outdir", str(outdir), *map(str, flags)])
        err = capsys.readouterr().err
        written = [path for path in outdir.rglob("*") if path.is_file()] if outdir.exists() else []
        assert not written, f"files written for a refused run: {written}"
        return status, err.strip().splitlines()
    return run


def assert_refused(status: int, lines: list[str], words: str, name: str) -> None:
    assert status == 2 and len(lines) == 1, (status, lines)
    assert lines[0].startswith("txt2img.py: error: ") and "Traceback" not in lines[0], lines
    assert words in lines[0] and name in lines[0], (words, name, lines[0])


@pytest.fixture(scope="module")
def skeleton():
    """The tiny SD 1.x model with its parameters on the meta device, as the pipeline checks files against it."""
    return instantiate_on_meta(load_config(TINY_CONFIG).model)


@pytest.fixture(scope="module")
def tiny_model(tiny_checkpoints):
    return load_model(tiny_checkpoints["v1", ".ckpt"], TINY_CONFIG)


# ---------------------------------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("name", CHECKPOINTS)
def test_crafted_checkpoint(name, case_folder, tiny_checkpoints, cli):
    folder, marker = case_folder
    write, words = CHECKPOINTS[name]
    path = write(folder, marker, tiny_state(tiny_checkpoints))
    # a key, shape or dtype mismatch names the tensor and the config (as check_keys does for every checkpoint)
    named = "" if "kind of number" in words else path.name
    for entry_point in (check_loadable, load_model):
        with pytest.raises(LoadError) as refusal:
            entry_point(path, TINY_CONFIG)
        assert words in str(refusal.value) and named in str(refusal.value), str(refusal.value)
    assert_refused(*cli("--ckpt", path, "--config", TINY_CONFIG), words, named)
    if "kind of number" not in words:  # those files' autoencoder weights are fine
        assert_refused(*cli("--vae", path, "--ckpt", tiny_checkpoints["v1", ".ckpt"], "--config", TINY_CONFIG),
                       words, path.name)
    assert not marker.exists()


SAFETENSORS_CASES = [name for name in CHECKPOINTS if "safetensors" in name and "larger than" not in name]


@pytest.mark.parametrize("name", SAFETENSORS_CASES)
def test_reader_refuses_what_the_safetensors_library_refuses(name, case_folder, tiny_checkpoints):
    from safetensors import SafetensorError, safe_open

    folder, marker = case_folder
    path = CHECKPOINTS[name][0](folder, marker, tiny_state(tiny_checkpoints))
    with pytest.raises(SafetensorError):
        with safe_open(str(path), framework="numpy"):
            pass
    with pytest.raises(CheckpointError):
        read_checkpoint(path)


def test_valid_safetensors_variants_still_read(tmp_path):
    """What the library accepts is read: unaligned data, an empty file of tensors, unknown header fields."""
    for name, header, data in (
            ("unaligned", b'{"a": {"dtype": "F16", "shape": [1], "data_offsets": [0, 2]}, "b": {"dtype": "F32", '
                          b'"shape": [1], "data_offsets": [2, 6]}}', b"\x00\x3c" + struct.pack("<f", 2.5)),
            ("no_tensors", b"{}", b""),
            ("extra_field", b'{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8], "note": "x"}}', F32)):
        path = write_bytes(tmp_path / f"{name}.safetensors", safetensors_bytes(header, data))
        tensors, _ = read_checkpoint(path)
        assert {key: value.tolist() for key, value in tensors.items()} == {
            "unaligned": {"a": [1.0], "b": [2.5]}, "no_tensors": {}, "extra_field": {"a": [0.0, 0.0]}}[name]


# -------------------------------------------------------------------------------------------------------- configs
def write_config(folder: Path, marker: Path, key: str, value) -> Path:
    path = folder / "crafted.yaml"
    if key == "INTERPOLATION_BOMB":
        lines = ["model:", "  target: ldm.models.diffusion.ddpm.LatentDiffusion", "  params:", "    x0: aaaaaaaa"]
        lines += [f"    x{i}: ${{model.params.x{i - 1}}}${{model.params.x{i - 1}}}" for i in range(1, 41)]
        path.write_text("\n".join(lines) + "\n")
    elif key == "ALIAS_BOMB":
        lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
        lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 10)]
        path.write_text("\n".join(lines) + "\nmodel:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n")
    elif key == "DEEP_YAML":
        path.write_text("model: " + "[" * 100_000 + "]" * 100_000 + "\n")
    else:
        config = OmegaConf.load(TINY_CONFIG)
        text = json.dumps(value).replace("{marker}", str(marker)) if value != "BIGINT" else "1" + "0" * 400
        OmegaConf.update(config, key, "PLACEHOLDER", force_add=True)
        path.write_text(OmegaConf.to_yaml(config).replace("PLACEHOLDER", text))
    return path


@pytest.mark.parametrize("name", CONFIGS)
def test_crafted_config(name, case_folder, tiny_checkpoints, cli):
    folder, marker = case_folder
    key, value, words = CONFIGS[name]
    path = write_config(folder, marker, key, value)
    start = time.perf_counter()
    for entry_point in (check_loadable, load_model):
        with pytest.raises(LoadError) as refusal:
            entry_point(tiny_checkpoints["v1", ".ckpt"], path)
        assert words in str(refusal.value) and path.name in str(refusal.value), str(refusal.value)
    assert_refused(*cli("--ckpt", tiny_checkpoints["v1", ".ckpt"], "--config", path), words, path.name)
    assert time.perf_counter() - start < 10  # the bombs are refused, not expanded
    assert not marker.exists()


def test_a_config_beside_the_checkpoint_runs_nothing(case_folder, tiny_checkpoints, cli):
    folder, marker = case_folder
    checkpoint = shutil.copy(tiny_checkpoints["v1", ".ckpt"], folder / "model.ckpt")
    (folder / "model.yaml").write_text(
        f"model:\n  target: subprocess.run\n  params:\n    args: [touch, {marker}]\n")
    with pytest.raises(LoadError, match="config model.yaml cannot build its model .config target 'subprocess.run'"):
        check_loadable(checkpoint)
    assert_refused(*cli("--ckpt", checkpoint), "config target 'subprocess.run' is outside this project", "model.yaml")
    assert not marker.exists()


def test_a_controlnet_config_beside_the_file_runs_nothing(case_folder, tiny_checkpoints, cli):
    folder, marker = case_folder
    controlnet = make_tiny_controlnet(folder / "control_tiny.pth")
    config = OmegaConf.load(TEST_CONFIGS / "tiny-cldm-v1.yaml")
    config.model.params.control_stage_config = {"target": "builtins.open",
                                                "params": {"file": str(marker), "mode": "w"}}
    OmegaConf.save(config, folder / "control_tiny.yaml")
    with pytest.raises(LoadError, match="control_tiny.yaml cannot build its ControlNet .config target "
                                        "'builtins.open' is outside this project"):
        load_controlnet(controlnet)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(folder / "edges.png")
    assert_refused(*cli("--ckpt", tiny_checkpoints["v1", ".ckpt"], "--config", TINY_CONFIG, "--controlnet",
                        controlnet, "--control_image", folder / "edges.png"),
                   "config target 'builtins.open' is outside this project", "control_tiny.yaml")
    assert not marker.exists()


def test_sgm_network_wrapper_is_a_target_too(tiny_xl_checkpoints, case_folder):
    folder, marker = case_folder
    config = OmegaConf.load(TEST_CONFIGS / "tiny-xl.yaml")
    config.model.params.network_wrapper = "os.system"
    OmegaConf.save(config, folder / "wrapper.yaml")
    with pytest.raises(LoadError, match="wrapper.yaml cannot build its model .config target 'os.system'"):
        check_loadable(tiny_xl_checkpoints["xl"], folder / "wrapper.yaml")


def test_trust_builds_foreign_classes_nested_too():
    """trusted=True builds what the config names, in nested configs as well; untrusted refuses before importing."""
    config = OmegaConf.load(TINY_CONFIG).model
    config.params.cond_stage_config.target = "torch.nn.modules.linear.Identity"  # Identity, under a foreign name
    with pytest.raises(UntrustedTargetError, match="'torch.nn.modules.linear.Identity' is outside this project"):
        instantiate_on_meta(config)
    model = instantiate_on_meta(config, trusted=True)
    assert type(model.cond_stage_model) is torch.nn.Identity
    assert instantiate_from_config({"target": "collections.OrderedDict", "params": {"a": 10**9}},
                                   trusted=True) == {"a": 10**9}
    # training-only sections are dropped, not built, so their foreign targets are not refused
    assert type(instantiate_from_config({"target": "torch.nn.Identity", "params": {}})) is torch.nn.Identity
    released = OmegaConf.load(TINY_CONFIG).model
    released.params.lossconfig = {"target": "taming.modules.losses.DummyLoss"}
    instantiate_on_meta(released)


# ---------------------------------------------------------------------------------------------------------- LoRAs
@pytest.mark.parametrize("name", LORAS)
def test_crafted_lora(name, case_folder, skeleton, tiny_model, tiny_checkpoints, cli):
    folder, marker = case_folder
    content, words = LORAS[name]
    path = content(folder, marker) if callable(content) else write_tensors(folder / "crafted.safetensors", content)
    before = {key: value.clone() for key, value in tiny_model.state_dict().items()}
    refusals = []
    for entry_point in (check_lora, apply_lora):
        try:
            entry_point(skeleton if entry_point is check_lora else tiny_model, path)
        except LoraError as error:
            refusals.append(str(error))
    assert refusals and all(words in text for text in refusals), refusals
    assert all(torch.equal(value, before[key]) for key, value in tiny_model.state_dict().items())
    assert_refused(*cli("--ckpt", tiny_checkpoints["v1", ".ckpt"], "--config", TINY_CONFIG, "--lora", path),
                   words, path.name)
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------------- embeddings
@pytest.mark.parametrize("name", EMBEDDINGS)
def test_crafted_embedding(name, case_folder, skeleton, tiny_checkpoints, cli):
    folder, marker = case_folder
    write, words = EMBEDDINGS[name]
    path = write(folder, marker)
    with pytest.raises(EmbeddingError) as refusal:
        for embedding in read_embeddings([path]):
            check_textual_inversion(skeleton, embedding)
    assert words in str(refusal.value) and path.name in str(refusal.value), str(refusal.value)
    assert_refused(*cli("--ckpt", tiny_checkpoints["v1", ".ckpt"], "--config", TINY_CONFIG, "--embeddings", path),
                   words, path.name)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------------ tokenizer
def test_a_131k_character_word_tokenizes_in_well_under_a_second():
    tokenizer = CLIPTokenizer()
    tokenizer.encode("warm up the vocabulary")
    generator = random.Random(0)
    for word in ("".join(generator.choice(string.ascii_lowercase) for _ in range(131_072)), "a" * 131_072,
                 "\U0001f600" * 32_768):
        start = time.process_time()  # CPU time: other processes on a shared machine do not count
        ids = tokenizer.encode(word)
        assert time.process_time() - start < 0.5 and len(ids) > 75


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    from reference_text import write_hf_vocabulary

    folder = tmp_path_factory.mktemp("vocabulary")
    write_hf_vocabulary(folder)
    return transformers.CLIPTokenizer.from_pretrained(str(folder), pad_token="<|endoftext|>")


def test_words_up_to_the_cap_get_the_reference_ids(hf_tokenizer):
    """Long single words (letters, CJK, emoji, punctuation runs) up to MAX_WORD_BYTES: the ids of transformers'
    CLIPTokenizer (the tokenizers library's BPE) on the same vocabulary."""
    generator = random.Random(1)
    alphabets = [string.ascii_lowercase, "abcdefghij\u00e9\u00fc\u00df", "\u6771\u4eac\u306e\u591c\u666f\ud55c",
                 "\U0001f431\U0001f680\u2728", "!?.,;:-=+*&^%$#@~"]
    words = []
    for alphabet in alphabets:
        for length in (1, 2, 7, 40, 300, 1000):
            words.append("".join(generator.choice(alphabet) for _ in range(length)))
        longest = ""
        while len(longest.encode()) + 4 <= MAX_WORD_BYTES:
            longest += generator.choice(alphabet)
        words.append(longest)
    ours = CLIPTokenizer()
    for word in words:
        assert len(word.encode()) <= MAX_WORD_BYTES
        reference = hf_tokenizer(word, add_special_tokens=False)["input_ids"]
        assert ours.encode(word) == reference, word[:40]
