"""A folder of images, each captioned by the `.txt` file of the same name (`cat.png` + `cat.txt`), for fine-tuning."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps
from torch.utils.data import Dataset

from ldm.data.shapes import to_tensor

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def find_captioned_images(root: Path, caption_suffix: str, default_caption: str | None) -> list[tuple[Path, str]]:
    """(image, caption) pairs under `root`, sorted by path; a missing caption file is an error unless a default
    caption is given."""
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    images = sorted(path for path in root.rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file())
    if not images:
        raise ValueError(f"image folder {root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    pairs, uncaptioned = [], []
    for image in images:
        caption_path = image.with_suffix(caption_suffix)
        if caption_path.is_file():
            pairs.append((image, " ".join(caption_path.read_text(encoding="utf-8").split())))
        elif default_caption is not None:
            pairs.append((image, default_caption))
        else:
            uncaptioned.append(image.name)
    if uncaptioned:
        shown = ", ".join(uncaptioned[:3]) + (f" and {len(uncaptioned) - 3} more" if len(uncaptioned) > 3 else "")
        raise ValueError(f"{len(uncaptioned)} image(s) in {root} have no {caption_suffix} caption ({shown}): "
                         "write one next to each image, or set default_caption")
    return pairs


def resize_and_crop(image: Image.Image, size: int, center_crop: bool) -> Image.Image:
    """Shorter side to `size`, then the central `size` x `size` square (or a squash to it without `center_crop`)."""
    image = ImageOps.exif_transpose(image).convert("RGB")
    if not center_crop:
        return image.resize((size, size), Image.Resampling.BICUBIC)
    scale = size / min(image.size)
    width, height = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    image = image.resize((width, height), Image.Resampling.BICUBIC)
    left, top = (width - size) // 2, (height - size) // 2
    return image.crop((left, top, left + size, top + size))


class CaptionedImageFolder(Dataset):
    """Images of `root` (searched recursively) at `size` x `size`, each with its caption; `repeats` lists every image
    that many times per epoch. With `flip`, item i is mirrored or not as seed (`seed`, i) decides."""

    def __init__(self, root: str | os.PathLike, size: int = 512, center_crop: bool = True, flip: bool = False,
                 repeats: int = 1, caption_suffix: str = ".txt", default_caption: str | None = None, seed: int = 0):
        if size < 8 or size % 8:
            raise ValueError(f"size {size} must be a positive multiple of 8 (the autoencoder downsamples by 8)")
        if repeats < 1:
            raise ValueError(f"repeats must be at least 1, got {repeats}")
        self.root = Path(root)
        self.items = find_captioned_images(self.root, caption_suffix, default_caption)
        self.size = size
        self.center_crop = center_crop
        self.flip = flip
        self.repeats = repeats
        self.seed = seed

    def __len__(self) -> int:
        return len(self.items) * self.repeats

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} is outside this data set of {len(self)} items")
        path, caption = self.items[index % len(self.items)]
        with Image.open(path) as opened:
            image = resize_and_crop(opened, self.size, self.center_crop)
        if self.flip and np.random.default_rng([self.seed, index]).random() < 0.5:
            image = ImageOps.mirror(image)
        return {"image": to_tensor(image), "caption": caption, "index": index}
