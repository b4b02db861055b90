"""Numbered outputs: numbering from names, exclusive creation, no truncated files after a failure midway."""
from __future__ import annotations

import multiprocessing
import os

import pytest

from ldm.cli import outputs
from ldm.cli.outputs import next_grid_number, next_sample_number, write_new_file


def test_numbering_continues_after_the_highest_number_not_the_count(tmp_path):
    for name in ("00000.png", "00007.png", "00003.yaml", "notes.txt", ".hidden.tmp", "123456.png"):
        (tmp_path / name).write_bytes(b"x")
    assert next_sample_number(tmp_path) == 123457
    assert next_sample_number(tmp_path / "absent") == 0
    for name in ("grid-0002.png", "grid-0010.yaml", "samples", "grid-x.png"):
        (tmp_path / name).write_bytes(b"x")
    assert next_grid_number(tmp_path) == 11


def test_lone_sidecar_number_is_not_reused(tmp_path):
    (tmp_path / "00004.yaml").write_text("prompt: a")
    path, number = write_new_file(tmp_path, "{:05d}.png", next_sample_number(tmp_path), b"png")
    assert (path.name, number) == ("00005.png", 5)


def test_existing_files_are_skipped_never_overwritten(tmp_path):
    (tmp_path / "00000.png").write_bytes(b"old0")
    (tmp_path / "00001.png").write_bytes(b"old1")
    path, number = write_new_file(tmp_path, "{:05d}.png", 0, b"new")
    assert number == 2 and path.read_bytes() == b"new"
    assert (tmp_path / "00000.png").read_bytes() == b"old0" and (tmp_path / "00001.png").read_bytes() == b"old1"
    assert sorted(os.listdir(tmp_path)) == ["00000.png", "00001.png", "00002.png"]  # no temporary left


def test_failure_while_writing_leaves_no_file_under_a_final_name(tmp_path, monkeypatch):
    (tmp_path / "00000.png").write_bytes(b"kept")

    def killed(descriptor):
        raise KeyboardInterrupt  # stands for the process dying between writing and publishing

    monkeypatch.setattr(outputs.os, "fsync", killed)
    with pytest.raises(KeyboardInterrupt):
        write_new_file(tmp_path, "{:05d}.png", 1, b"half written")
    assert sorted(os.listdir(tmp_path)) == ["00000.png"]
    assert (tmp_path / "00000.png").read_bytes() == b"kept"


def test_without_hard_links_names_are_still_exclusive(tmp_path, monkeypatch):
    def no_links(source, target):
        raise PermissionError("links not supported")

    monkeypatch.setattr(outputs.os, "link", no_links)
    (tmp_path / "00000.png").write_bytes(b"old")
    path, number = write_new_file(tmp_path, "{:05d}.png", 0, b"new")
    assert number == 1 and path.read_bytes() == b"new" and (tmp_path / "00000.png").read_bytes() == b"old"
    assert sorted(os.listdir(tmp_path)) == ["00000.png", "00001.png"]


def _writer(directory: str, tag: int, count: int) -> None:
    for index in range(count):
        write_new_file(directory, "{:05d}.png", next_sample_number(directory), f"{tag}-{index}".encode())


def test_concurrent_writers_never_overwrite_each_other(tmp_path):
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_writer, args=(str(tmp_path), tag, 25)) for tag in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    contents = sorted(path.read_bytes() for path in tmp_path.iterdir())
    assert len(contents) == 75
    assert contents == sorted(f"{tag}-{index}".encode() for tag in range(3) for index in range(25))
    assert sorted(int(path.stem) for path in tmp_path.iterdir()) == list(range(75))
