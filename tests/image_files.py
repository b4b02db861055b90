"""Reading what the scripts write: a PNG's pixels and its parameters text, an image's .yaml sidecar."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml
from PIL import Image


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def parameters(path) -> str:
    with Image.open(path) as image:
        return image.info["parameters"]


def sidecar(path) -> dict:
    return yaml.safe_load(Path(path).with_suffix(".yaml").read_text(encoding="utf-8"))
