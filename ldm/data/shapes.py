"""Coloured shapes on plain backgrounds, drawn with Pillow, captioned "a red circle on a blue background".

Item `i` of a data set with seed `s` is a pure function of (s, i): nothing is stored, any item can be drawn again.
Four shapes, six colours (any two differ between shape and background), four sizes and a jittered position.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "white": (240, 240, 240),
    "black": (20, 20, 20),
}
# Shape sizes as fractions of the image side: the bounding box of the drawn shape.
SIZE_FRACTIONS = (0.4, 0.5, 0.6, 0.7)
MARGIN_FRACTION = 0.06  # the shape keeps this much of the side free from the border, so the border shows background


@dataclass(frozen=True)
class ShapeSpec:
    """What one image shows; `box` is (left, top, right, bottom) in pixels of the final image."""

    shape: str
    colour: str
    background: str
    box: tuple[float, float, float, float]

    @property
    def caption(self) -> str:
        return caption(self.shape, self.colour, self.background)


def caption(shape: str, colour: str, background: str) -> str:
    return f"a {colour} {shape} on a {background} background"


def all_prompts(shapes: Sequence[str] = SHAPES, colours: Sequence[str] = tuple(COLOURS)) -> list[tuple[str, str, str]]:
    """Every (shape, colour, background) the data set draws, background differing from the shape's colour."""
    return [(shape, colour, background) for shape in shapes for colour in colours for background in colours
            if colour != background]


def _check_names(names: Sequence[str], known: Sequence[str], what: str) -> tuple[str, ...]:
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"unknown {what} {unknown}: choose from {list(known)}")
    return tuple(names)


def shape_polygons(shape: str, box: tuple[float, float, float, float]) -> list[list[tuple[float, float]]]:
    """The shape inside `box` as polygons (a circle is drawn as an ellipse instead and returns [])."""
    left, top, right, bottom = box
    width, height = right - left, bottom - top
    if shape == "circle":
        return []
    if shape == "square":
        return [[(left, top), (right, top), (right, bottom), (left, bottom)]]
    if shape == "triangle":
        return [[(left + width / 2, top), (right, bottom), (left, bottom)]]
    if shape == "cross":  # a plus sign whose arms are a third of the box wide
        third_w, third_h = width / 3, height / 3
        return [[(left + third_w, top), (right - third_w, top), (right - third_w, bottom), (left + third_w, bottom)],
                [(left, top + third_h), (right, top + third_h), (right, bottom - third_h), (left, bottom - third_h)]]
    raise ValueError(f"unknown shape {shape!r}: choose from {list(SHAPES)}")


def render(spec: ShapeSpec, size: int, supersample: int = 4) -> Image.Image:
    """The RGB image of `spec`, `size` pixels square, anti-aliased by drawing `supersample` times larger."""
    big = size * supersample
    image = Image.new("RGB", (big, big), COLOURS[spec.background])
    draw = ImageDraw.Draw(image)
    fill = COLOURS[spec.colour]
    box = tuple(coordinate * supersample for coordinate in spec.box)
    if spec.shape == "circle":
        # Pillow's ellipse includes its right/bottom edge pixel; one pixel less keeps the box exact
        draw.ellipse((box[0], box[1], box[2] - 1, box[3] - 1), fill=fill)
    for polygon in shape_polygons(spec.shape, box):
        draw.polygon(polygon, fill=fill)
    return image.resize((size, size), Image.Resampling.BOX) if supersample > 1 else image


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> float [3, H, W] in [-1, 1]."""
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy())  # [H, W, 3]
    return pixels.permute(2, 0, 1) / 127.5 - 1.0  # [3, H, W]


class ShapesDataset(Dataset):
    """`length` coloured-shape images of `size` x `size` pixels, item i drawn from seed (`seed`, i).

    `shapes` and `colours` restrict the vocabulary (default: all of `SHAPES` and `COLOURS`).
    """

    def __init__(self, size: int = 32, length: int = 100_000, seed: int = 0, shapes: Sequence[str] | None = None,
                 colours: Sequence[str] | None = None, supersample: int = 4):
        if size < 8:
            raise ValueError(f"size {size} is too small to draw shapes: use at least 8 pixels")
        if length < 1:
            raise ValueError(f"length must be at least 1, got {length}")
        self.size = size
        self.length = length
        self.seed = seed
        self.supersample = supersample
        self.shapes = _check_names(shapes if shapes is not None else SHAPES, SHAPES, "shapes")
        self.colours = _check_names(colours if colours is not None else tuple(COLOURS), tuple(COLOURS), "colours")
        if len(self.colours) < 2:
            raise ValueError(f"colours {list(self.colours)}: need at least two, one for the shape, one for the ground")

    def __len__(self) -> int:
        return self.length

    def describe(self, index: int) -> ShapeSpec:
        """What item `index` shows, without drawing it."""
        if not 0 <= index < self.length:
            raise IndexError(f"index {index} is outside this data set of {self.length} items")
        rng = np.random.default_rng([self.seed, index])
        shape = self.shapes[rng.integers(len(self.shapes))]
        colour_index, background_index = rng.choice(len(self.colours), size=2, replace=False)
        side = SIZE_FRACTIONS[rng.integers(len(SIZE_FRACTIONS))] * self.size
        free = self.size - side - 2 * MARGIN_FRACTION * self.size  # room left for the position jitter
        left = MARGIN_FRACTION * self.size + rng.uniform(0.0, max(free, 0.0))
        top = MARGIN_FRACTION * self.size + rng.uniform(0.0, max(free, 0.0))
        return ShapeSpec(shape, self.colours[colour_index], self.colours[background_index],
                         (left, top, left + side, top + side))

    def image(self, index: int) -> Image.Image:
        return render(self.describe(index), self.size, self.supersample)

    def __getitem__(self, index: int) -> dict:
        spec = self.describe(index)
        return {"image": to_tensor(render(spec, self.size, self.supersample)), "caption": spec.caption, "index": index}
