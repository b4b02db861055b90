"""Noise that reproduces anywhere: each image draws from its own CPU generator (image i of a run uses seed + i)."""
from __future__ import annotations

from typing import Callable, Sequence

import torch


class ImageNoise:
    """Gaussian noise for a batch, one CPU `torch.Generator` per image.

    Every draw (starting latents, ancestral and SDE steps) continues each image's own stream, so an image depends
    only on its seed: not on the batch size, its place in the batch, or the device the model runs on.
    """

    def __init__(self, seeds: Sequence[int]):
        if not seeds:
            raise ValueError("ImageNoise needs at least one seed")
        self.seeds = [int(seed) for seed in seeds]
        self.generators = [torch.Generator("cpu").manual_seed(seed) for seed in self.seeds]

    @classmethod
    def from_seed(cls, seed: int, batch_size: int) -> "ImageNoise":
        """Seeds `seed, seed + 1, ..., seed + batch_size - 1`, as the CLI numbers a run's images."""
        return cls([seed + index for index in range(batch_size)])

    @classmethod
    def from_global_rng(cls, batch_size: int) -> "ImageNoise":
        """Seeds drawn from torch's global RNG: only for CompVis-style callers that seed globally and pass none."""
        return cls(torch.randint(0, 2**62, (batch_size,)).tolist())

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, shape: Sequence[int], device: torch.device | str | None = None,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Standard normal noise of `shape` = (batch, ...), with batch equal to the number of seeds."""
        if shape[0] != len(self.generators):
            raise ValueError(f"noise for a batch of {shape[0]} requested from {len(self.generators)} seeds")
        # drawn in float32 on the CPU whatever the target, so every device and precision starts from the same numbers
        per_image = [torch.randn(tuple(shape[1:]), generator=g, dtype=torch.float32) for g in self.generators]
        return torch.stack(per_image).to(device=device, dtype=dtype)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.randn(x.shape, device=x.device, dtype=x.dtype)

    def noise_sampler(self, x: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """A k-diffusion style `noise_sampler(sigma, sigma_next)` returning fresh noise shaped like `x`."""
        return lambda sigma, sigma_next: self.randn_like(x)
