"""AUTOMATIC1111's extra-network tags in prompts: `<lora:name:te_weight:unet_weight>` (also `te=`/`unet=`, and the
`lyco` spelling). The tags are taken out of the text the encoder reads and name LoRA files to merge; the prompt as
written (tags included) is what the metadata records, as AUTOMATIC1111 records it.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ldm.pipeline.errors import UsageError

EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")  # AUTOMATIC1111's re_extra_net
LORA_KINDS = ("lora", "lyco")
LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt", ".bin")


@dataclass(frozen=True)
class LoraTag:
    """One `<lora:...>` tag: the name as written, and its text-encoder and UNet weights."""

    name: str
    text_encoder_weight: float = 1.0
    unet_weight: float = 1.0


def strip_extra_networks(prompt: str) -> str:
    """`prompt` without its extra-network tags (of every kind, as AUTOMATIC1111 removes them all)."""
    return EXTRA_NETWORK.sub("", prompt)


def _weight(text: str, tag: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"{tag}: the weight {text!r} is not a number (write <lora:name:0.8>)") from None
    if not math.isfinite(value):
        raise UsageError(f"{tag}: the weight {text!r} is not a finite number")
    return value


def lora_tags(prompt: str) -> list[LoraTag]:
    """The LoRA tags of `prompt`, in order: `<lora:name>` (weight 1), `<lora:name:w>` (both w),
    `<lora:name:te:unet>`, or with `te=` / `unet=` named, as AUTOMATIC1111 reads them."""
    tags = []
    for match in EXTRA_NETWORK.finditer(prompt):
        if match.group(1).lower() not in LORA_KINDS:
            continue
        items = match.group(2).split(":")
        positional = [item for item in items if "=" not in item]
        named = dict(item.split("=", 1) for item in items if "=" in item)
        if not positional or not positional[0].strip():
            raise UsageError(f"{match.group(0)}: a LoRA tag needs a name (write <lora:name:0.8>)")
        text_encoder = _weight(positional[1], match.group(0)) if len(positional) > 1 else 1.0
        text_encoder = _weight(named["te"], match.group(0)) if "te" in named else text_encoder
        unet = _weight(positional[2], match.group(0)) if len(positional) > 2 else text_encoder
        unet = _weight(named["unet"], match.group(0)) if "unet" in named else unet
        tags.append(LoraTag(positional[0].strip(), text_encoder, unet))
    return tags


def other_networks(prompts: Sequence[str]) -> list[str]:
    """Tags of kinds this tool does not load (hypernetworks, ...), each once: taken out of the text, not applied."""
    found = [match.group(0) for prompt in prompts for match in EXTRA_NETWORK.finditer(prompt)
             if match.group(1).lower() not in LORA_KINDS]
    return list(dict.fromkeys(found))


def lora_present(name: str, folder: str | os.PathLike) -> bool:
    try:
        find_lora(name, folder)
    except UsageError:
        return False
    return True


def find_lora(name: str, folder: str | os.PathLike) -> Path:
    """The file of LoRA `name` in `folder` (searched below it too): `name` with a LoRA suffix, or a file whose stem is
    `name`; UsageError naming the folder when there is none."""
    root = Path(folder)
    if root.is_dir():
        direct = [root / f"{name}{suffix}" for suffix in LORA_SUFFIXES]
        found = [path for path in direct if path.is_file()] or sorted(
            path for path in root.rglob("*") if path.is_file() and path.suffix.lower() in LORA_SUFFIXES
            and path.stem == Path(name).name)
        if found:
            return found[0]
    raise UsageError(f"<lora:{name}> names a LoRA that is not in {folder} (looked for {name}.safetensors, .pt, "
                     f".ckpt, .bin, also in its subfolders): put it there or pass --lora_dir")
