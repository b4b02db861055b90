"""txt2img as users run it: a real `python scripts/txt2img.py` process, and one killed midway."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "scripts" / "txt2img.py"


def command(tiny_checkpoint, tiny_config, outdir, *flags) -> list[str]:
    return [sys.executable, str(SCRIPT), "--ckpt", str(tiny_checkpoint), "--config", str(tiny_config), "--H", "32",
            "--W", "32", "--ddim_steps", "2", "--outdir", str(outdir), *map(str, flags)]


def environment(tmp_path) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(tmp_path / "cache")}


def test_script_runs_as_a_process(tiny_checkpoint, tiny_config, tmp_path):
    done = subprocess.run(command(tiny_checkpoint, tiny_config, tmp_path / "out", "--n_samples", 2, "--n_iter", 1,
                                  "--prompt", "a lighthouse"),
                          cwd=tmp_path, env=environment(tmp_path), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Your samples are ready and waiting for you here" in done.stdout and "it/s" in done.stdout
    assert sorted(p.name for p in (tmp_path / "out/samples").glob("*.png")) == ["00000.png", "00001.png"]
    with Image.open(tmp_path / "out/samples/00001.png") as image:
        assert image.info["parameters"].startswith("a lighthouse\nSteps: 2, Sampler: DDIM, CFG scale: 7.5, Seed: 43")
    bad = subprocess.run(command(tiny_checkpoint, tiny_config, tmp_path / "bad", "--H", 30), cwd=tmp_path,
                         env=environment(tmp_path), capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1] == (
        "txt2img.py: error: flags: H 30 is not a positive multiple of 8: try 24 or 32")
    assert "Traceback" not in bad.stderr and not (tmp_path / "bad").exists()


def test_killed_process_leaves_only_complete_images(tiny_checkpoint, tiny_config, tmp_path):
    out = tmp_path / "out"
    (out / "samples").mkdir(parents=True)
    (out / "samples" / "00000.png").write_bytes(b"an earlier image")
    process = subprocess.Popen(command(tiny_checkpoint, tiny_config, out, "--n_samples", 1, "--n_iter", 500,
                                       "--skip_grid"),
                               cwd=tmp_path, env=environment(tmp_path), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(list((out / "samples").glob("*.png"))) < 4 and time.monotonic() < deadline:
            assert process.poll() is None, "the run ended before it could be killed"
            time.sleep(0.05)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    assert (out / "samples" / "00000.png").read_bytes() == b"an earlier image"
    images = sorted((out / "samples").glob("*.png"))
    assert len(images) >= 4
    for path in images[1:]:
        with Image.open(path) as image:
            image.load()  # a truncated PNG would raise here
        assert image.info["parameters"]
    assert [int(path.stem) for path in images] == list(range(len(images)))
