"""A run's images as units of one batch, shared out over the processes of a torchrun world, written as numbered files
and recorded in the manifest.

Everything that decides a file is fixed before any process renders: rank 0 picks the first file number (after the
highest present, or the one a resumed run started with) and which images a `--resume` still has to make, and
broadcasts both. Image i of the plan is then file number base + i, made with its own seed in its own batch, so the
folder is the same whatever the world size. Batch k goes to rank k mod world size.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image
from tqdm import tqdm

from ldm.cli.distributed import World
from ldm.cli.images import make_grid
from ldm.cli.manifest import Manifest, run_key
from ldm.cli.outputs import GRID_DIGITS, SAMPLE_DIGITS, next_grid_number, next_sample_number, write_new_files
from ldm.cli.plan import PlannedImage
from ldm.pipeline import Request, Result
from ldm.pipeline.decoding import black_images
from ldm.pipeline.errors import GenerationError
from ldm.pipeline.metadata import ImageRecord, encode_png, parameters_text, read_png_parameters, sidecar_text

Unit = tuple[list[PlannedImage], Request]


@dataclass
class GridItem:
    """One image of the grid: its place in the run, pixels, sidecar entry and "parameters" text."""

    index: int
    pixels: np.ndarray
    entry: dict[str, Any]
    text: str | None


@dataclass
class RankTotals:
    """What one process made, for the summary."""

    rank: int
    images: int = 0
    steps: int = 0
    sampling_seconds: float = 0.0
    decoding_seconds: float = 0.0
    seconds: float = 0.0
    failed: list[str] = field(default_factory=list)


@dataclass
class Outputs:
    """Where and how a run writes: the flags that decide its files."""

    outdir: Path
    skip_save: bool = False
    skip_grid: bool = False
    no_metadata: bool = False
    per_row: int = 1
    resume: bool = False

    @property
    def sample_dir(self) -> Path:
        return self.outdir / "samples"

    def files(self, pixels: np.ndarray, text: str | None, sidecar: dict[str, Any]) -> dict[str, bytes]:
        """{suffix: bytes}: the PNG with its "parameters" text and the .yaml sidecar (the PNG alone without
        metadata)."""
        if self.no_metadata:
            return {".png": encode_png(pixels, None)}
        return {".png": encode_png(pixels, text), ".yaml": sidecar_text(sidecar).encode("utf-8")}


class Job:
    """The units of a run, this process's share of them, and what they wrote."""

    def __init__(self, units: Sequence[Unit], outputs: Outputs, world: World, identity: Sequence[Any],
                 note: Callable[[str], None]):
        self.units, self.outputs, self.world, self.note = list(units), outputs, world, note
        self.manifest = Manifest(outputs.outdir)
        self.grid_done = False  # a resumed run whose grid was written: not written again
        images = [image for batch, _ in self.units for image in batch]
        self.total = len(images)
        self.key = run_key([*identity, *((image.index, image.prompt, image.negative_prompt, image.seed,
                                          sorted(image.settings.items())) for image in images)])
        self.base, self.done, self.grid_done = world.broadcast(self.decide() if world.leader else None)
        self.totals = RankTotals(world.rank)
        self.saved: list[Path] = []
        self.grid: list[GridItem] = []

    def decide(self) -> tuple[int, dict[int, dict[str, Any]], bool]:
        """(first file number, {index: manifest line} of the images already made, whether the grid was written): a
        resumed run's own, else a number after the highest present."""
        done: dict[int, dict[str, Any]] = {}
        base = None
        if self.outputs.resume:
            for entry in self.manifest.entries(self.key):
                base = entry["base"]
                if entry["status"] == "grid":
                    self.grid_done = self.grid_done or (self.outputs.outdir / entry["file"]).exists()
                    continue
                file = entry.get("file")
                finished = entry["status"] == "done" and (file is None or (self.outputs.outdir / file).exists())
                if finished:
                    done[entry["index"]] = entry
                else:
                    done.pop(entry["index"], None)
        return (next_sample_number(self.outputs.sample_dir) if base is None else base), done, self.grid_done

    def mine(self) -> list[Unit]:
        """This process's units (batch k to rank k mod world size) that still have images to make."""
        todo = [unit for unit in self.units if any(image.index not in self.done for image in unit[0])]
        return todo[self.world.rank::self.world.size]

    def run(self, render: Callable[[Request], Result],
            finish: Callable[[np.ndarray], tuple[np.ndarray, list[bool]]]) -> RankTotals:
        start = time.perf_counter()
        progress = tqdm(total=self.total, initial=len(self.done), desc="Sampling",
                        disable=not self.world.leader or len(self.units) <= 1)
        for batch, request in self.mine():
            self.make(batch, request, render, finish)
            progress.n = len(self.done) + self.finished_lines() if self.world.distributed else progress.n + len(batch)
            progress.refresh()
        progress.close()
        self.totals.seconds = time.perf_counter() - start
        return self.totals

    def finished_lines(self) -> int:
        """Images of this run recorded (by any process) since it started."""
        recorded = {entry["index"] for entry in self.manifest.entries(self.key) if "index" in entry}
        return len(recorded - set(self.done))

    def make(self, batch: list[PlannedImage], request: Request, render: Callable[[Request], Result],
             finish: Callable[[np.ndarray], tuple[np.ndarray, list[bool]]]) -> None:
        """Render one unit and write its images; a unit that fails is recorded as failed and the run goes on."""
        try:
            result = render(request)
        except GenerationError as error:
            self.totals.failed.append(str(error))
            for image in batch:
                self.manifest.append({"run": self.key, "base": self.base, "index": image.index, "seed": image.seed,
                                      "status": "failed", "error": str(error)})
            self.note(f"images {batch[0].index}..{batch[-1].index} failed: {error}")
            return
        totals = self.totals
        totals.images, totals.steps = totals.images + len(batch), totals.steps + result.steps
        totals.sampling_seconds += result.sampling_seconds
        totals.decoding_seconds += result.decoding_seconds
        pixels, flagged = finish(result.pixels)
        for image, image_pixels, record, was_flagged, is_black in zip(batch, pixels, result.records, flagged,
                                                                      black_images(pixels)):
            if image.index not in self.done:
                self.write(image, image_pixels, record, was_flagged, is_black)

    def write(self, image: PlannedImage, pixels: np.ndarray, record: ImageRecord, flagged: bool, black: bool) -> None:
        outputs, entry = self.outputs, record.to_mapping()
        text = None if outputs.no_metadata else parameters_text(record)
        label, file = f"image {image.index} (seed {image.seed})", None
        if not outputs.skip_save:
            paths, _ = write_new_files(outputs.sample_dir, f"{{:0{SAMPLE_DIGITS}d}}", self.base + image.index,
                                       outputs.files(pixels, text, entry))
            self.saved.append(paths[0])
            label, file = str(paths[0]), f"samples/{paths[0].name}"
            entry["file"] = file
        if flagged:
            self.note(f"{label}: flagged by the safety checker, replaced by a black image")
        elif black:
            self.note(f"{label}: the model produced an entirely black image")
        self.manifest.append({"run": self.key, "base": self.base, "index": image.index, "seed": image.seed,
                              "status": "done", "file": file, "entry": entry})
        if not outputs.skip_grid:
            self.grid.append(GridItem(image.index, pixels, entry, text))

    def finish(self) -> list[RankTotals]:
        """Wait for every process; rank 0 writes the grid of the whole run. Returns every rank's totals."""
        totals = self.world.gather(self.totals)
        items = self.world.gather(self.grid)
        if not self.world.leader or self.outputs.skip_grid or self.grid_done:
            return totals
        grid = [item for part in items for item in part] + [self.earlier(index) for index in self.done]
        grid = sorted((item for item in grid if item is not None), key=lambda item: item.index)
        if grid:
            path = self.write_grid(grid)
            self.saved.append(path)
            self.manifest.append({"run": self.key, "base": self.base, "status": "grid", "file": path.name})
        return totals

    def earlier(self, index: int) -> GridItem | None:
        """An image a resumed run made before, read back from its file."""
        entry = self.done[index]
        if entry.get("file") is None:
            return None
        path = self.outputs.outdir / entry["file"]
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
        return GridItem(index, pixels, entry.get("entry", {}), None if self.outputs.no_metadata
                        else read_png_parameters(str(path)))

    def write_grid(self, items: list[GridItem]) -> Path:
        outdir = self.outputs.outdir
        grid = make_grid([item.pixels for item in items], self.outputs.per_row)
        paths, _ = write_new_files(outdir, f"grid-{{:0{GRID_DIGITS}d}}", next_grid_number(outdir),
                                   self.outputs.files(grid, items[0].text, {"images": [item.entry for item in items]}))
        return paths[0]
