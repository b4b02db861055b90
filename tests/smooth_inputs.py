"""Smooth random inputs that look like real ones: images for the autoencoder, latents for the decoder's tiling."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def smooth_image(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth random RGB image (colour blobs), so the autoencoder sees image-like input."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize((width, height), resample=Image.BICUBIC)


def smooth_latent(height: int, width: int, batch: int = 1) -> torch.Tensor:
    """Spatially correlated latents, like real ones (white noise would make every tile look alike)."""
    noise = torch.randn(batch, 4, height + 4, width + 4, generator=torch.Generator().manual_seed(0))
    return F.avg_pool2d(noise, 5, 1) * 2
