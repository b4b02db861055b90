"""Prompt files for `--from-file`: one prompt a line, or JSON-object lines with per-prompt settings, or sidecars.

Text files: UTF-8; blank lines and lines starting with `#` are skipped; a line starting with `{` is a JSON object
with a `prompt` and any of the override keys. A `.yaml`/`.yml` file is an image sidecar (or a list of them, or a grid
sidecar with an `images` list), so a saved image's settings can be run again.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

from ldm.pipeline.metadata import INFO_KEYS, PromptFileError, checked_info

MAX_PROMPT_FILE_BYTES = 16 << 20  # a prompt file of 16 MiB holds about 100,000 long prompts
MAX_PROMPTS = 100_000  # per file: as many images as a run may make

# Per-prompt settings a line may override, with the type each must have.
OVERRIDE_TYPES: dict[str, tuple[type, ...]] = {
    "negative_prompt": (str,), "seed": (int,), "scale": (int, float), "steps": (int,), "H": (int,), "W": (int,),
    "sampler": (str,), "eta": (int, float),
}
@dataclass
class PromptJob:
    """One prompt with the settings it overrides; `source` says where it came from, for messages."""

    prompt: str
    overrides: dict[str, Any] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)
    source: str = "--prompt"


def job_from_mapping(mapping: Mapping[str, Any], source: str, allow_empty: bool = False) -> PromptJob:
    """A `PromptJob` from a JSON line or sidecar mapping; PromptFileError names the bad key or value. An empty
    prompt is a mistake in a prompt file, but a recorded image (`allow_empty`) may have been made from one."""
    prompt = mapping.get("prompt")
    if not isinstance(prompt, str) or (not prompt.strip() and not allow_empty):
        raise PromptFileError(f"{source}: needs a non-empty string 'prompt'")
    allowed = ("prompt", *OVERRIDE_TYPES, *INFO_KEYS)
    unknown = [key for key in mapping if key not in allowed]
    if unknown:
        raise PromptFileError(f"{source}: unknown key {unknown[0]!r}; allowed keys: {', '.join(allowed[:-len(INFO_KEYS)])}")
    overrides: dict[str, Any] = {}
    for key, types in OVERRIDE_TYPES.items():
        if key not in mapping or mapping[key] is None:
            continue
        value = mapping[key]
        if isinstance(value, bool) or not isinstance(value, types):
            wanted = "a number" if float in types else ("an integer" if int in types else "a string")
            raise PromptFileError(f"{source}: {key} must be {wanted}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):
            raise PromptFileError(f"{source}: {key} must be a finite number, got {value!r}")
        overrides[key] = value
    return PromptJob(prompt=prompt, overrides=overrides, info=checked_info(mapping, source), source=source)


def _read_text(path: Path) -> str:
    try:
        with open(path, "rb") as handle:  # bounded: /dev/zero or a stray checkpoint is not read whole
            data = handle.read(MAX_PROMPT_FILE_BYTES + 1)
    except FileNotFoundError:
        raise PromptFileError(f"prompt file {path} does not exist") from None
    except IsADirectoryError:
        raise PromptFileError(f"prompt file {path} is a directory, not a file") from None
    except OSError as error:
        raise PromptFileError(f"cannot read prompt file {path}: {error.strerror or error}") from None
    if len(data) > MAX_PROMPT_FILE_BYTES:
        raise PromptFileError(f"prompt file {path} is larger than {MAX_PROMPT_FILE_BYTES >> 20} MiB: split it into "
                              f"several files (or check that it is a prompt file)")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[: error.start].count(b"\n") + 1
        raise PromptFileError(f"prompt file {path} is not UTF-8 (byte 0x{data[error.start]:02x} on line {line}): "
                              f"save it as UTF-8") from None


def _jobs_from_yaml(path: Path, text: str) -> list[PromptJob]:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise PromptFileError(f"{path} is not valid yaml: {str(error).splitlines()[0]}") from None
    if isinstance(data, dict) and isinstance(data.get("images"), list):
        data = data["images"]
    entries = data if isinstance(data, list) else [data]
    if not all(isinstance(entry, dict) for entry in entries):
        raise PromptFileError(f"{path}: expected an image sidecar (a mapping with 'prompt') or a list of them")
    return [job_from_mapping(entry, f"{path} entry {index + 1}", allow_empty=True)
            for index, entry in enumerate(entries)]


def read_prompt_file(path: str) -> list[PromptJob]:
    """All prompts of `path`, in order; PromptFileError (one line) if the file is unreadable, empty or malformed."""
    file_path = Path(path)
    text = _read_text(file_path)
    if file_path.suffix.lower() in (".yaml", ".yml"):
        jobs = _jobs_from_yaml(file_path, text)
    else:
        jobs = []
        for number, line in enumerate(text.splitlines(), start=1):
            stripped = line.strip()
            if not stripped or stripped.startswith("#"):
                continue
            source = f"{path} line {number}"
            if stripped.startswith("{"):
                try:
                    mapping = json.loads(stripped)
                except json.JSONDecodeError as error:
                    raise PromptFileError(f"{source}: malformed JSON ({error.msg} at column {error.colno})") from None
                if not isinstance(mapping, dict):
                    raise PromptFileError(f"{source}: expected a JSON object")
                jobs.append(job_from_mapping(mapping, source))
            else:
                jobs.append(PromptJob(prompt=stripped, source=source))
    if not jobs:
        raise PromptFileError(f"prompt file {path} has no prompts (blank lines and # comments are skipped)")
    if len(jobs) > MAX_PROMPTS:
        raise PromptFileError(f"prompt file {path} has {len(jobs)} prompts, more than {MAX_PROMPTS}: split it into "
                              f"several files")
    return jobs
