"""How a bulk run scales under torchrun: the same prompt file with 1 process, then with N, images per second of each.

    python scripts/benchmark_scaling.py                          # the shapes model, 1 vs 2 CPU processes
    python scripts/benchmark_scaling.py --ckpt sd-v1-5.safetensors --processes 8 --threads 0 -- --H 512 --W 512

Both runs use the same command (flags after `--` are passed to scripts/txt2img.py) and the same machine, with
--threads CPU threads in every process (on GPUs each process has its own device). The rate is images over the slowest process's generation time (loading excluded), as the scripts'
summary reports it; the ratio is N processes' rate over one process's.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = str(ROOT / "scripts" / "txt2img.py")
SHAPES = ROOT / "models" / "shapes" / "shapes.safetensors"
PROMPTS = ["a red circle on a blue background", "a green square on a white background",
           "a yellow triangle on a black background", "a blue circle on a red background"]


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ckpt", default=str(SHAPES), help="checkpoint (default: the shapes model)")
    parser.add_argument("--processes", type=int, default=2, help="processes of the second run (default: 2)")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads per process (0: torch's default) (default: 1)")
    parser.add_argument("--prompts", type=int, default=16, help="lines in the prompt file (default: 16)")
    parser.add_argument("--steps", type=int, default=20, help="sampling steps (default: 20)")
    args, rest = parser.parse_known_args(argv)
    return args, [flag for flag in rest if flag != "--"]


def rate(stdout: str) -> tuple[int, float]:
    """(images, seconds) from a txt2img summary: the torchrun line, or the one-process sampling line."""
    many = re.search(r"processes: \d+; images: (\d+) in ([\d.]+) s", stdout)
    one = re.search(r"sampling: (\d+) images in ([\d.]+) s, [\d.]+ s/image, [\d.]+ it/s; decoding ([\d.]+) s", stdout)
    if many:
        return int(many.group(1)), float(many.group(2))
    if one:
        return int(one.group(1)), float(one.group(2)) + float(one.group(3))
    raise SystemExit(f"no summary in the output:\n{stdout[-2000:]}")


def run(processes: int, threads: int, flags: list[str], outdir: Path) -> tuple[int, float]:
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
                if processes > 1 else [sys.executable])
    result = subprocess.run([*launcher, SCRIPT, *flags, "--outdir", str(outdir)], env=env, capture_output=True,
                            text=True)
    if result.returncode != 0:
        raise SystemExit(f"the run with {processes} process(es) failed:\n{result.stderr[-2000:]}")
    return rate(result.stdout)


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        prompts = Path(folder) / "prompts.txt"
        prompts.write_text("\n".join(PROMPTS[i % len(PROMPTS)] for i in range(args.prompts)) + "\n")
        flags = ["--ckpt", args.ckpt, "--from-file", str(prompts), "--n_iter", "1", "--n_samples", "1",
                 "--ddim_steps", str(args.steps), "--skip_grid", "--no_metadata", *extra]
        one = run(1, args.threads, flags, Path(folder) / "one")
        many = run(args.processes, args.threads, flags, Path(folder) / "many")
    one_rate, many_rate = one[0] / one[1], many[0] / many[1]
    print(f"1 process:  {one[0]} images in {one[1]:.2f} s, {one_rate:.2f} images/s")
    print(f"{args.processes} processes: {many[0]} images in {many[1]:.2f} s, {many_rate:.2f} images/s")
    print(f"scaling: {many_rate / one_rate:.2f}x with {args.processes} processes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
