"""From decoded tensors to saved pixels: uint8 conversion, the CompVis grid layout, the optional watermark."""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np

GRID_PADDING = 2  # torchvision's make_grid default, which the CompVis script uses
WATERMARK_TEXT = "StableDiffusionV1"


def make_grid(images: Sequence[np.ndarray], per_row: int) -> np.ndarray:
    """Images [H, W, 3] in rows of `per_row`, with torchvision's 2-pixel black padding (CompVis `make_grid`).

    Images of different sizes (prompt-file overrides) sit in the top-left corner of cells as large as the largest.
    """
    columns = min(per_row, len(images))
    rows = math.ceil(len(images) / columns)
    cell_h = max(image.shape[0] for image in images) + GRID_PADDING
    cell_w = max(image.shape[1] for image in images) + GRID_PADDING
    grid = np.zeros((rows * cell_h + GRID_PADDING, columns * cell_w + GRID_PADDING, 3), dtype=np.uint8)
    for index, image in enumerate(images):
        top = (index // columns) * cell_h + GRID_PADDING
        left = (index % columns) * cell_w + GRID_PADDING
        grid[top: top + image.shape[0], left: left + image.shape[1]] = image
    return grid


class MissingDependency(Exception):
    """An optional package a flag needs is not installed; the message says which and how to install it."""


class Watermarker:
    """The invisible watermark of the CompVis script (`invisible-watermark`, DWT-DCT), imported only when asked for."""

    def __init__(self, text: str = WATERMARK_TEXT):
        try:
            from imwatermark import WatermarkEncoder
        except ImportError:
            raise MissingDependency("--watermark needs the invisible-watermark package: "
                                    "pip install invisible-watermark (or run without --watermark)") from None
        self.encoder = WatermarkEncoder()
        self.encoder.set_watermark("bytes", text.encode("utf-8"))

    def apply(self, pixels: np.ndarray) -> np.ndarray:
        """Watermarked copy of uint8 RGB `pixels`; the encoder works on BGR, as OpenCV images are."""
        bgr = np.ascontiguousarray(pixels[:, :, ::-1])
        marked = self.encoder.encode(bgr, "dwtDct")
        return np.ascontiguousarray(np.asarray(marked, dtype=np.uint8)[:, :, ::-1])
