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

from ldm.modules.encoders.clip_tokenizer import CLIPTokenizer
from ldm.modules.encoders.prompt_weighting import has_weighting_syntax, parse_prompt_attention
from ldm.pipeline.metadata import INFO_KEYS, PromptFileError, checked_info

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
        data = path.read_bytes()
    except FileNotFoundError:
        raise PromptFileError(f"prompt file {path} does not exist") from None
    except IsADirectoryError:
        raise PromptFileError(f"prompt file {path} is a directory, not a file") from None
    except OSError as error:
        raise PromptFileError(f"cannot read prompt file {path}: {error.strerror or error}") from None
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
    return jobs


def _shorten(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def truncation_notes(prompts: list[str], context_length: int = 77, tokenizer: Any = None) -> list[str]:
    """One line per distinct prompt longer than the text encoder reads (context_length - 2 tokens: start and end
    take two), naming the words it drops, as the model would otherwise ignore them silently. `tokenizer`: one that
    knows the run's embeddings (default: plain CLIP)."""
    tokenizer, room, notes = tokenizer or CLIPTokenizer(), context_length - 2, []
    for prompt in dict.fromkeys(prompts):
        ids = tokenizer.encode(prompt)
        if len(ids) > room:
            notes.append(f"prompt \"{_shorten(prompt)}\" has {len(ids)} tokens but the text encoder reads {room}: "
                         f"\"{_shorten(tokenizer.decode(ids[room:]))}\" is ignored")
    return notes


def weighting_notes(prompts: list[str], weighting: bool) -> list[str]:
    """With --prompt_weighting, none, after checking that every prompt can be read with weights (ValueError naming
    the first that cannot); without, one note for the run if a prompt uses A1111's weighting syntax."""
    if weighting:
        for prompt in dict.fromkeys(prompts):
            for text, weight in parse_prompt_attention(prompt):
                if weight is not None and not math.isfinite(weight):  # a weight like (word:1e400), or nested ones
                    raise ValueError(f"the weight of \"{_shorten(text)}\" in prompt \"{_shorten(prompt)}\" "
                                     f"overflows to {weight}: use weights such as (word:1.2)")
        return []
    marked = next((prompt for prompt in dict.fromkeys(prompts) if has_weighting_syntax(prompt)), None)
    if marked is None:
        return []
    return [f"prompt \"{_shorten(marked)}\" uses A1111 weighting syntax ((word), [word], (word:1.2), BREAK), which "
            f"is read as plain text: pass --prompt_weighting to read it as weights"]
