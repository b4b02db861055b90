"""Numbered output files that never collide: `samples/NNNNN.png` and `grid-NNNN.png`, as CompVis names them.

Numbers continue after the highest one present (parsed from names; counting entries breaks as soon as a file is
deleted or a stray file appears). Each file is first written in full to a hidden temporary name created with O_EXCL,
then hard-linked to its final name: `link` fails if that name exists, so two runs at once never overwrite each
other (the loser moves on to the next number), and a run killed midway leaves at most a hidden temporary file,
never a truncated image under a final name.
"""
from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

SAMPLE_DIGITS = 5
GRID_DIGITS = 4
_SAMPLE_NAME = re.compile(r"^(\d+)\.[A-Za-z0-9]+$")
_GRID_NAME = re.compile(r"^grid-(\d+)\.[A-Za-z0-9]+$")


def next_number(directory: str | os.PathLike, pattern: re.Pattern[str] = _SAMPLE_NAME) -> int:
    """One past the highest number that `pattern` (one group of digits) finds among the names in `directory`."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return 0
    numbers = [int(match.group(1)) for match in map(pattern.match, names) if match]
    return max(numbers, default=-1) + 1


def next_sample_number(sample_dir: str | os.PathLike) -> int:
    """The number for the next `NNNNN.png` in `sample_dir` (sidecars count too, so a lone sidecar is never reused)."""
    return next_number(sample_dir, _SAMPLE_NAME)


def next_grid_number(outdir: str | os.PathLike) -> int:
    return next_number(outdir, _GRID_NAME)


def _write_temporary(directory: Path, data: bytes) -> Path:
    """`data` in full, flushed to disk, under a fresh hidden name in `directory` (same file system as the target)."""
    while True:
        temporary = directory / f".txt2img-{os.getpid()}-{secrets.token_hex(4)}.tmp"
        try:
            descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(descriptor, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return temporary


def _publish(temporary: Path, target: Path) -> None:
    """Give the finished `temporary` the name `target`, failing with FileExistsError if that name is taken."""
    try:
        os.link(temporary, target)
    except FileExistsError:
        raise
    except OSError:
        # No hard links on this file system: reserving the name with O_EXCL keeps runs apart; the reserved
        # (empty) file is replaced in one atomic rename.
        os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        os.replace(temporary, target)


def write_new_file(directory: str | os.PathLike, name_format: str, first_number: int, data: bytes) -> tuple[Path, int]:
    """Write `data` to `directory/name_format.format(n)` for the first n >= `first_number` whose name is free.

    Returns the path and n. The file appears complete or not at all, and an existing file is never touched.
    """
    paths, number = write_new_files(directory, name_format, first_number, {"": data})
    return paths[0], number


def write_new_files(directory: str | os.PathLike, name_format: str, first_number: int,
                    data_by_suffix: dict[str, bytes]) -> tuple[list[Path], int]:
    """Write each `data_by_suffix` entry to `directory/name_format.format(n) + suffix` for the first n >=
    `first_number` at which every one of those names is free (an image and its sidecar share their number).

    Each name is taken exclusively (a link, never through a symbolic link in its place); when a later name of the
    set is taken meanwhile, the ones this call made are removed and the next number is tried. Returns the paths and
    n.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    temporaries = {suffix: _write_temporary(directory, data) for suffix, data in data_by_suffix.items()}
    number = first_number
    try:
        while True:
            made: list[Path] = []
            try:
                for suffix, temporary in temporaries.items():
                    target = directory / (name_format.format(number) + suffix)
                    _publish(temporary, target)
                    made.append(target)
                return made, number
            except FileExistsError:
                for path in made:
                    path.unlink(missing_ok=True)
                number += 1
    finally:
        for temporary in temporaries.values():
            temporary.unlink(missing_ok=True)


def can_create_file_in(directory: str | os.PathLike) -> bool:
    """Whether a file can be created (and removed) in `directory`: tried, as permission bits do not tell (root,
    /proc, read-only mounts)."""
    probe = Path(directory) / f".txt2img-probe-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        probe.unlink()
    except OSError:
        return False
    return True
