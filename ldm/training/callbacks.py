"""Callbacks of a training run: checkpoints with their `.safetensors` export, and sample grids to watch progress."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from ldm.training.export import save_safetensors
from ldm.training.lightning import pl

LAST_CKPT = "last.ckpt"
LAST_SAFETENSORS = "last.safetensors"


class CheckpointAndExport(pl.Callback):
    """Every `every_n_steps` optimizer steps, at the end of training and on Ctrl-C: `<dirpath>/last.ckpt` (the
    resumable Lightning checkpoint, released key layout) and `<dirpath>/last.safetensors` (what the run ships)."""

    def __init__(self, dirpath: str | os.PathLike, every_n_steps: int):
        super().__init__()
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self.saved_step: int | None = None

    def save(self, trainer: Any, module: Any) -> None:
        if trainer.global_step == self.saved_step or trainer.global_rank != 0:
            return
        self.dirpath.mkdir(parents=True, exist_ok=True)
        temporary = self.dirpath / f".{LAST_CKPT}.tmp"
        trainer.save_checkpoint(temporary, weights_only=False)
        os.replace(temporary, self.dirpath / LAST_CKPT)
        save_safetensors(module.export_state_dict(), self.dirpath / LAST_SAFETENSORS, module.export_metadata())
        self.saved_step = trainer.global_step

    def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_index: int) -> None:
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self.save(trainer, module)

    def on_train_end(self, trainer: Any, module: Any) -> None:
        self.save(trainer, module)

    def on_exception(self, trainer: Any, module: Any, exception: BaseException) -> None:
        if isinstance(exception, KeyboardInterrupt):
            self.save(trainer, module)


def save_grid(pixels: np.ndarray, path: Path, columns: int) -> None:
    """uint8 images [N, H, W, 3] as one PNG, `columns` per row."""
    count, height, width, _ = pixels.shape
    rows = -(-count // columns)
    grid = np.zeros((rows * height, columns * width, 3), dtype=np.uint8)
    for index, image in enumerate(pixels):
        row, column = divmod(index, columns)
        grid[row * height:(row + 1) * height, column * width:(column + 1) * width] = image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).save(path)


class SampleImages(pl.Callback):
    """Every `every_n_steps` steps and at the end: `<dirpath>/step-NNNNNN.png`, samples of `prompts` (diffusion) or
    reconstructions of the first batch (autoencoder)."""

    def __init__(self, dirpath: str | os.PathLike, every_n_steps: int, prompts: Sequence[str] = (),
                 steps: int = 20, scale: float = 5.0, sampler: str = "ddim", seed: int = 0):
        super().__init__()
        self.dirpath = Path(dirpath)
        self.every_n_steps = every_n_steps
        self.prompts = list(prompts)
        self.steps, self.scale, self.sampler, self.seed = steps, scale, sampler, seed
        self.reference_images = None
        self.sampled_step: int | None = None

    def sample(self, trainer: Any, module: Any) -> None:
        if trainer.global_step == self.sampled_step or trainer.global_rank != 0:
            return
        if hasattr(module, "ldm"):
            if not self.prompts:
                return
            pixels = module.sample_images(self.prompts, self.steps, self.scale, self.sampler, self.seed)
            columns = min(8, len(pixels))
        else:
            if self.reference_images is None:
                return
            pixels = module.sample_images(self.reference_images)
            columns = len(self.reference_images)  # inputs on the first row, their reconstructions below
        save_grid(pixels, self.dirpath / f"step-{trainer.global_step:06d}.png", columns)
        self.sampled_step = trainer.global_step

    def on_train_batch_end(self, trainer: Any, module: Any, outputs: Any, batch: Any, batch_index: int) -> None:
        if self.reference_images is None:
            self.reference_images = batch["image"][:8].detach().clone()
        if self.every_n_steps and trainer.global_step % self.every_n_steps == 0:
            self.sample(trainer, module)

    def on_train_end(self, trainer: Any, module: Any) -> None:
        self.sample(trainer, module)
