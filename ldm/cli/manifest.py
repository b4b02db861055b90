"""`manifest.jsonl` in the output folder: one line per finished (or failed) image, appended atomically by every
process, so that `--resume` re-runs the same command and makes only what is missing, whatever the world size."""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

MANIFEST_NAME = "manifest.jsonl"


def run_key(parts: Iterable[Any]) -> str:
    """A short hash naming a run's plan (every image's prompt, seed and settings, the model and add-ons): the same
    command gives the same key, so a resumed run finds its own lines."""
    digest = hashlib.sha256(json.dumps(list(parts), sort_keys=True, default=str).encode("utf-8"))
    return digest.hexdigest()[:16]


class Manifest:
    """The manifest of an output folder."""

    def __init__(self, outdir: str | os.PathLike):
        self.path = Path(outdir) / MANIFEST_NAME

    def append(self, entry: dict[str, Any]) -> None:
        """Add one line, whole: one write under an exclusive lock, so lines of several processes never mix."""
        line = (json.dumps(entry, ensure_ascii=False) + "\n").encode("utf-8")  # keys kept in order: sidecars reuse them
        self.path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            os.write(descriptor, line)
            os.fsync(descriptor)
        finally:
            os.close(descriptor)  # releases the lock

    def entries(self, run: str) -> list[dict[str, Any]]:
        """The lines of run `run`, in the order they were written; a torn last line (a killed process) is skipped."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        found = []
        for line in text.splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and entry.get("run") == run:
                found.append(entry)
        return found
