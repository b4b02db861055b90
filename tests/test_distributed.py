"""The same command under torchrun (gloo on the CPU): 2 processes on one node, and 2 "nodes" of 1 process on
localhost, each make the folder a one-process run makes (names, pixels, metadata); `--resume` re-makes exactly what
is missing, also after a process was killed mid-run."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from image_files import pixels

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = str(ROOT / "scripts" / "txt2img.py")
PROMPTS = ["a red circle", "a blue square", "a green triangle", "a yellow star", "a purple moon"]

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo on Linux")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory, tiny_checkpoints):
    """(flags every run shares, environment): the tiny SD 1.x model, a 5-line prompt file, 2 iterations in
    batches of 2 (6 units), one thread per process (so that every run multiplies in the same order)."""
    folder = tmp_path_factory.mktemp("distributed")
    prompts = folder / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    flags = ["--ckpt", str(tiny_checkpoints["v1", ".safetensors"]), "--config", str(ROOT / "tests/configs/tiny-v1.yaml"),
             "--from-file", str(prompts), "--n_samples", "2", "--n_iter", "2", "--H", "32", "--W", "32",
             "--ddim_steps", "2", "--sampler", "euler_a", "--seed", "7"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(folder / "cache"), "PYTHONUNBUFFERED": "1"}
    return flags, env


def run_one(flags: list[str], env: dict, outdir: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *flags, "--outdir", str(outdir), *extra], env=env,
                          capture_output=True, text=True, timeout=300)


def torchrun(nproc: int, flags: list[str], env: dict, outdir: Path, *extra: str, nodes: int = 1,
             node_rank: int = 0, port: int | None = None, wait: bool = True):
    rendezvous = (["--standalone"] if nodes == 1 else
                  ["--nnodes", str(nodes), "--node_rank", str(node_rank), "--master_addr", "127.0.0.1",
                   "--master_port", str(port)])
    command = [sys.executable, "-m", "torch.distributed.run", *rendezvous, "--nproc_per_node", str(nproc), SCRIPT,
               *flags, "--outdir", str(outdir), *extra]
    if not wait:
        return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)


def folder_contents(outdir: Path) -> dict[str, object]:
    """{relative name: pixels (PNG) or text (sidecar)} of every output but the manifest."""
    contents: dict[str, object] = {}
    for path in sorted(outdir.rglob("*")):
        name = str(path.relative_to(outdir))
        if path.suffix == ".png":
            contents[name] = pixels(path)
        elif path.suffix == ".yaml":
            contents[name] = path.read_text()
    return contents


def assert_same_folder(actual: Path, expected: Path) -> None:
    got, want = folder_contents(actual), folder_contents(expected)
    assert sorted(got) == sorted(want)
    for name, value in want.items():
        if isinstance(value, np.ndarray):
            assert np.array_equal(got[name], value), name
        else:
            assert got[name] == value, name
    done = sorted(line["index"] for line in map(json.loads, (actual / "manifest.jsonl").read_text().splitlines())
                  if line["status"] == "done")
    assert done == list(range(len(list((expected / "samples").glob("*.png")))))


@pytest.fixture(scope="module")
def reference(setup, tmp_path_factory) -> Path:
    flags, env = setup
    outdir = tmp_path_factory.mktemp("reference") / "out"
    result = run_one(flags, env, outdir)
    assert result.returncode == 0, result.stderr
    assert len(list((outdir / "samples").glob("*.png"))) == 10 and (outdir / "grid-0000.png").exists()
    return outdir


def test_two_processes_on_one_node_make_the_one_process_folder(setup, reference, tmp_path):
    flags, env = setup
    result = torchrun(2, flags, env, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert_same_folder(tmp_path / "out", reference)
    assert "processes: 2; images: 10 in" in result.stdout and "slowest: rank" in result.stdout
    assert result.stdout.count("Your samples are ready") == 1  # rank 0 speaks for the run


def test_two_nodes_of_one_process_make_the_one_process_folder(setup, reference, tmp_path):
    flags, env = setup
    port = free_port()
    nodes = [torchrun(1, flags, env, tmp_path / "out", nodes=2, node_rank=rank, port=port, wait=False)
             for rank in (0, 1)]
    outputs = [node.communicate(timeout=300) for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], [err for _, err in outputs]
    assert_same_folder(tmp_path / "out", reference)


def test_resume_remakes_exactly_the_deleted_images_with_another_world_size(setup, reference, tmp_path):
    flags, env = setup
    out = tmp_path / "out"
    assert torchrun(2, flags, env, out).returncode == 0
    manifest = out / "manifest.jsonl"
    lines = manifest.read_text().splitlines()
    removed = {3, 8}
    kept = [line for line in lines if json.loads(line).get("index") not in removed]
    manifest.write_text("\n".join(kept) + "\n")
    for index in removed:
        for suffix in (".png", ".yaml"):
            (out / "samples" / f"{index:05d}{suffix}").unlink()
    before = {path: path.stat().st_mtime_ns for path in (out / "samples").iterdir()}
    result = run_one(flags, env, out, "--resume")
    assert result.returncode == 0, result.stderr
    assert_same_folder(out, reference)
    assert all(path.stat().st_mtime_ns == mtime for path, mtime in before.items())  # the others untouched
    new = manifest.read_text().splitlines()[len(kept):]
    assert sorted(json.loads(line)["index"] for line in new) == sorted(removed)


def test_a_world_larger_than_the_work(setup, tmp_path):
    flags, env = setup
    one = flags + ["--n_iter", "1", "--from-file", str(tmp_path / "one.txt")]
    (tmp_path / "one.txt").write_text("a lone prompt\n")
    assert run_one(one, env, tmp_path / "expected").returncode == 0
    result = torchrun(2, one, env, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert_same_folder(tmp_path / "out", tmp_path / "expected")


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


def test_a_killed_process_loses_only_its_batch_and_resume_completes_the_folder(setup, reference, tmp_path):
    flags, env = setup
    out = tmp_path / "out"
    slow = flags + ["--ddim_steps", "20", "--n_iter", "4"]  # 12 units: time to kill one process mid-run
    launcher = torchrun(2, slow, env, out, wait=False)
    manifest = out / "manifest.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (not manifest.exists() or len(manifest.read_text().splitlines()) < 2):
        time.sleep(0.05)
    workers = children(launcher.pid)
    assert workers, "torchrun started no worker"
    os.kill(workers[-1], signal.SIGKILL)
    launcher.communicate(timeout=120)
    made = len([line for line in manifest.read_text().splitlines() if '"done"' in line])
    assert launcher.returncode != 0 and made < 20
    result = torchrun(2, slow, env, out, "--resume")
    assert result.returncode == 0, result.stderr
    expected = tmp_path / "expected"
    assert run_one(slow, env, expected).returncode == 0
    assert_same_folder(out, expected)
