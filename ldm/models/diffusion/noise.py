"""Noise that reproduces anywhere: each image draws from its own generator (image i of a run uses seed + i).

`ImageNoise(seeds)` gives each image a CPU `torch.Generator`. Its options reproduce AUTOMATIC1111's noise
(modules/rng.py `ImageRNG`, modules/processing.py): the random source (`rng`: "cpu", "gpu" = torch on the CUDA
device, "nv" = CUDA's Philox emulated on any device, `rng.py`), variation seeds (`subseeds`, `subseed_strength`:
the starting noise is the spherical interpolation of the seed's and the subseed's noise), resize-seed-from (the
starting noise of another size, centred and cropped into this one), and the eta noise seed delta (`ensd`: after the
starting noise each image's stream restarts from seed + ensd, for the ancestral and SDE steps).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from ldm.models.diffusion.rng import PhiloxGenerator, philox_randn

RNG_SOURCES = ("cpu", "gpu", "nv")

__all__ = ["ImageNoise", "RNG_SOURCES", "philox_randn", "seeded_randn", "slerp", "variation_seeds"]


def _check_rng(rng: str) -> str:
    source = rng.lower()
    if source not in RNG_SOURCES:
        raise ValueError(f"unknown random source {rng!r}: choose cpu (torch's CPU generator), gpu (torch on the "
                         "CUDA device) or nv (CUDA's generator emulated on any device)")
    if source == "gpu" and not torch.cuda.is_available():
        raise ValueError("random source 'gpu' draws on the CUDA device and this machine has none: use 'nv', which "
                         "gives the same numbers on any device")
    return source


class _Stream:
    """One image's generator in random source `rng`: `randn(shape)` continues its stream (float32; on the CPU for
    cpu and nv, on the CUDA device for gpu)."""

    def __init__(self, seed: int, rng: str):
        self.rng = rng
        if rng == "cpu":
            self.generator: torch.Generator | PhiloxGenerator = torch.Generator("cpu").manual_seed(seed)
        elif rng == "gpu":
            self.generator = torch.Generator(torch.device("cuda")).manual_seed(seed)
        else:
            self.generator = PhiloxGenerator(seed)

    def randn(self, shape: tuple[int, ...]) -> torch.Tensor:
        if isinstance(self.generator, PhiloxGenerator):
            return self.generator.randn(shape)
        return torch.randn(shape, generator=self.generator, device=self.generator.device, dtype=torch.float32)


def seeded_randn(seed: int, shape: Sequence[int], rng: str = "cpu", device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The first draw of a fresh generator seeded with `seed` in random source `rng`: AUTOMATIC1111's `randn_local`,
    which its Brownian trees (and variation seeds) draw with."""
    return _Stream(seed, _check_rng(rng)).randn(tuple(int(size) for size in shape)).to(device=device, dtype=dtype)


def slerp(strength: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """AUTOMATIC1111's spherical interpolation from `low` (strength 0) to `high` (strength 1), exactly as it computes
    it for one image's [C, H, W] noise: each (channel, column) vector along dim 1 is interpolated on its own, and
    where they are nearly parallel on average (mean cosine > 0.9995) it falls back to low * strength +
    high * (1 - strength), weights as AUTOMATIC1111 has them."""
    low_unit = low / torch.norm(low, dim=1, keepdim=True)
    high_unit = high / torch.norm(high, dim=1, keepdim=True)
    cosine = (low_unit * high_unit).sum(1)
    if cosine.mean() > 0.9995:
        return low * strength + high * (1 - strength)
    omega = torch.acos(cosine)
    sin_omega = torch.sin(omega)
    return ((torch.sin((1.0 - strength) * omega) / sin_omega).unsqueeze(1) * low
            + (torch.sin(strength * omega) / sin_omega).unsqueeze(1) * high)


def variation_seeds(seed: int, count: int, subseed: int = 0,
                    subseed_strength: float = 0.0) -> tuple[list[int], list[int]]:
    """The seeds and subseeds of a run's `count` images as AUTOMATIC1111 numbers them: seed + i and subseed + i, but
    with a variation strength every image keeps `seed` (they differ by their subseeds)."""
    seeds = [int(seed) + (index if subseed_strength == 0 else 0) for index in range(count)]
    return seeds, [int(subseed) + index for index in range(count)]


class ImageNoise:
    """Gaussian noise for a batch, one generator per image.

    Every draw (starting latents, ancestral and SDE steps) continues each image's own stream, so an image depends
    only on its seed: not on the batch size, its place in the batch, or the device the model runs on.

    The first `randn` is the starting noise, to which the AUTOMATIC1111 options apply:
    - `rng`: "cpu" (default), "gpu" or "nv" (see the module docstring; gpu needs a CUDA device);
    - `subseeds`, `subseed_strength`: image i's starting noise is `slerp(subseed_strength, noise(seed_i),
      noise(subseed_i))`, the subseed's noise a fresh generator's first draw (a missing subseed counts as 0);
    - `seed_resize_from_w`, `seed_resize_from_h` (pixels, both > 0 to take effect): the seed's noise is drawn at
      that size / `downsampling` and pasted centred into (or cropped from the centre of) the image's own first
      draw, so a seed keeps its composition at another size;
    - `ensd` (eta noise seed delta): after the starting noise each stream restarts from seed_i + ensd.
    With none of them set, the numbers are the CPU generators' plain draws, as they always were.
    """

    def __init__(self, seeds: Sequence[int], *, rng: str = "cpu", ensd: int = 0,
                 subseeds: Sequence[int] | None = None, subseed_strength: float = 0.0, seed_resize_from_w: int = 0,
                 seed_resize_from_h: int = 0, downsampling: int = 8):
        if not seeds:
            raise ValueError("ImageNoise needs at least one seed")
        if not 0.0 <= subseed_strength <= 1.0:  # also refuses NaN
            raise ValueError(f"subseed_strength must lie in [0, 1], got {subseed_strength}")
        self.seeds = [int(seed) for seed in seeds]
        self.rng = _check_rng(rng)
        self.ensd = int(ensd)
        self.subseeds = None if subseeds is None else [int(seed) for seed in subseeds]
        self.subseed_strength = float(subseed_strength)
        self.seed_resize_from = ((int(seed_resize_from_h) // downsampling, int(seed_resize_from_w) // downsampling)
                                 if seed_resize_from_w > 0 and seed_resize_from_h > 0 else None)
        self._streams = [_Stream(seed, self.rng) for seed in self.seeds]
        self._started = False

    @classmethod
    def from_seed(cls, seed: int, batch_size: int) -> "ImageNoise":
        """Seeds `seed, seed + 1, ..., seed + batch_size - 1`, as the CLI numbers a run's images."""
        return cls([seed + index for index in range(batch_size)])

    @classmethod
    def from_global_rng(cls, batch_size: int) -> "ImageNoise":
        """Seeds drawn from torch's global RNG: only for CompVis-style callers that seed globally and pass none."""
        return cls(torch.randint(0, 2**62, (batch_size,)).tolist())

    def __len__(self) -> int:
        return len(self._streams)

    @property
    def generators(self) -> list[torch.Generator]:
        """Each image's torch.Generator (for draws made outside `randn`, such as sampling an encoded image); the nv
        source has none."""
        if self.rng == "nv":
            raise ValueError("random source 'nv' emulates CUDA's generator and has no torch.Generator: draw with "
                             "ImageNoise.randn")
        return [stream.generator for stream in self._streams]  # type: ignore[misc]

    def stream_randn(self, shape: Sequence[int]) -> torch.Tensor:
        """The next plain draw of each image's stream, [batch, ...] float32 (for draws made beside the starting
        noise, such as sampling an encoded image, in any random source; it does not count as the starting noise)."""
        if shape[0] != len(self._streams):
            raise ValueError(f"noise for a batch of {shape[0]} requested from {len(self._streams)} seeds")
        image_shape = tuple(int(size) for size in shape[1:])
        return torch.stack([stream.randn(image_shape).cpu() for stream in self._streams])

    def brownian_seeds(self) -> list[int]:
        """The seeds AUTOMATIC1111 gives each image's Brownian tree (DPM++ SDE and the other SDE samplers): the
        image seeds themselves, without the eta noise seed delta; the trees draw with `seeded_randn`."""
        return list(self.seeds)

    def seeded_randn(self, seed: int, shape: Sequence[int], device: torch.device | str | None = None,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """`seeded_randn` in this noise's random source."""
        return seeded_randn(seed, shape, self.rng, device, dtype)

    def randn(self, shape: Sequence[int], device: torch.device | str | None = None,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Standard normal noise of `shape` = (batch, ...), with batch equal to the number of seeds."""
        if shape[0] != len(self._streams):
            raise ValueError(f"noise for a batch of {shape[0]} requested from {len(self._streams)} seeds")
        image_shape = tuple(int(size) for size in shape[1:])
        if self._started:
            per_image = [stream.randn(image_shape) for stream in self._streams]
        else:
            # drawn in float32 (on the CPU unless rng is gpu) whatever the target, so every device and precision
            # starts from the same numbers
            per_image = [self._starting_noise(index, image_shape) for index in range(len(self._streams))]
            self._started = True
            if self.ensd:
                self._streams = [_Stream(seed + self.ensd, self.rng) for seed in self.seeds]
        return torch.stack(per_image).to(device=device, dtype=dtype)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        return self.randn(x.shape, device=x.device, dtype=x.dtype)

    def noise_sampler(self, x: torch.Tensor) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
        """A k-diffusion style `noise_sampler(sigma, sigma_next)` returning fresh noise shaped like `x`."""
        return lambda sigma, sigma_next: self.randn_like(x)

    def _starting_noise(self, index: int, shape: tuple[int, ...]) -> torch.Tensor:
        """Image `index`'s first draw with variation seed and resize-seed-from applied (ImageRNG.first)."""
        stream, seed = self._streams[index], self.seeds[index]
        noise_shape = shape
        if self.seed_resize_from is not None:
            if len(shape) != 3:
                raise ValueError(f"resize-seed-from needs [channels, height, width] latents, got {shape}")
            noise_shape = (shape[0], *self.seed_resize_from)
        variation = None
        if self.subseeds is not None and self.subseed_strength != 0:
            subseed = self.subseeds[index] if index < len(self.subseeds) else 0
            variation = seeded_randn(subseed, noise_shape, self.rng)
        noise = stream.randn(shape) if noise_shape == shape else seeded_randn(seed, noise_shape, self.rng)
        if variation is not None:
            noise = slerp(self.subseed_strength, noise, variation.to(noise.device))
        if noise_shape == shape:
            return noise
        return _paste_centred(noise, stream.randn(shape))


def _paste_centred(noise: torch.Tensor, canvas: torch.Tensor) -> torch.Tensor:
    """`canvas` [C, H, W] with `noise` [C, h, w] centred on it, cut to fit: AUTOMATIC1111's offsets, which for an
    odd difference in a shrinking dimension leave the last row or column of the canvas uncovered."""
    dx, dy = (canvas.shape[2] - noise.shape[2]) // 2, (canvas.shape[1] - noise.shape[1]) // 2
    width = noise.shape[2] if dx >= 0 else noise.shape[2] + 2 * dx
    height = noise.shape[1] if dy >= 0 else noise.shape[1] + 2 * dy
    target_x, target_y, source_x, source_y = max(dx, 0), max(dy, 0), max(-dx, 0), max(-dy, 0)
    canvas = canvas.clone()
    canvas[:, target_y:target_y + height, target_x:target_x + width] = (
        noise[:, source_y:source_y + height, source_x:source_x + width].to(canvas.device))
    return canvas
