"""Images given to the pipeline (init images, masks, control images, low-resolution images): read fully as 8-bit
RGB with one-line errors, and turned into tensors as CompVis and diffusers do."""
from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ldm.models.diffusion.inpainting import binarize_mask
from ldm.pipeline.errors import UsageError


def load_image(path: str | None, flag: str = "--init-img", purpose: str = "the image to start from") -> Any:
    """The image at `path` (given with `flag`) as an RGB PIL image, fully read; UsageError (one line) when it cannot
    be."""
    if not path:
        raise UsageError(f"{flag} is required: pass {purpose} (PNG, JPEG, ...)")
    if os.path.isdir(path):
        raise UsageError(f"{flag} {path} is a folder: pass the path of an image file")
    if not os.path.isfile(path):
        raise UsageError(f"{flag} {path} not found: pass the path of an image file")
    try:
        with Image.open(path) as image:
            return as_rgb(image)
    except UnidentifiedImageError:
        raise UsageError(f"{flag} {path} is not an image PIL can read: use a PNG, JPEG or WebP file") from None
    except Image.DecompressionBombError as error:  # PIL refuses to decode images this large
        raise UsageError(f"{flag} {path} is too large to open safely ({str(error).split(',')[0]}): scale it "
                         f"down first") from None
    except (OSError, ValueError) as error:  # truncated or damaged files fail while decoding
        raise UsageError(f"{flag} {path} cannot be read: {error}") from None


def as_rgb(image: Any) -> Any:
    """An 8-bit RGB copy of PIL `image`. 16-bit grey (PIL modes I;16*, and I holding values past 255) is scaled to
    8 bits and float grey (F) from [0, 1], where PIL's own convert would clip them to white or black."""
    if image.mode.startswith("I") or image.mode == "F":
        grey = np.asarray(image, dtype=np.float64)
        if image.mode == "F":
            grey = grey * 255.0 if grey.max(initial=0.0) <= 1.0 else grey
        elif image.mode.startswith("I;16") or grey.max(initial=0.0) > 255:
            grey = grey / 257.0  # 65535 -> 255
        return Image.fromarray(np.clip(np.round(grey), 0, 255).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def image_to_tensor(image: Any, width: int, height: int) -> torch.Tensor:
    """RGB PIL `image` resized (LANCZOS) to width x height, as [1, 3, H, W] float32 in [-1, 1] (CompVis `load_img`)."""
    resized = image.resize((width, height), resample=Image.LANCZOS)
    pixels = np.asarray(resized).astype(np.float32) / 255.0  # [H, W, 3]
    return 2.0 * torch.from_numpy(pixels).permute(2, 0, 1)[None] - 1.0


def mask_to_tensor(mask: Any, width: int, height: int) -> torch.Tensor:
    """The mask (PIL) in grey levels, resized (LANCZOS) to width x height and binarised: [1, 1, H, W], 1 = repaint."""
    grey = mask.convert("L").resize((width, height), resample=Image.LANCZOS)
    return binarize_mask(torch.from_numpy(np.asarray(grey).astype(np.float32) / 255.0)[None, None])
