"""Random sources and per-image noise: the Philox emulation of CUDA's torch.randn (ldm/models/diffusion/rng.py) against
published CUDA outputs, and ImageNoise's AUTOMATIC1111 options (noise.py: rng, ENSD, variation seeds, resize seed).

Sources of the known CUDA values (each printed by torch on an NVIDIA GPU; no GPU is needed here):
- Random123's `kat_vectors` (D. E. Shaw Research): Philox4x32 known answers, as copied verbatim into E. Sarmas'
  philox.py test cases;
- AUTOMATIC1111/stable-diffusion-webui `modules/rng_philox.py`, module docstring: seed 0, shape (3, 4), 8 digits;
- flashinfer-ai/flashinfer `flashinfer/logits_processor/processors.py` docstrings (Temperature, Sample):
  `torch.manual_seed(42); torch.randn(2, 2 | 2, 5, device="cuda")`;
- pytorch/pytorch#143086: `torch.randn(1, 49 * 12 * 112 * 144)` with a CUDA generator seeded 1, on an H100 and an A100;
  its first three values agree and its last three differ, which the thread count (`cuda_threads`) accounts for;
- pytorch/pytorch#158398: `torch.randn([1, 64, 2048])` with a CUDA generator seeded 42, the first machine's print (its
  last rows come from a 168-block launch, a 28-multiprocessor GPU with 1536 threads each, e.g. an RTX 3060);
- a public PyTorch inductor repro script found by content search (repository not identified): six consecutive
  `torch.randn(4)` on CUDA; its seed is not shown, 42 is inferred from its first tensor (flashinfer's seed-42 values).
Printed values have 4 decimals (8 for AUTOMATIC1111's), so they are compared to half a unit of the last printed digit.
"""
from __future__ import annotations

import math

import pytest
import torch

from ldm.models.diffusion.noise import ImageNoise, philox_randn, seeded_randn, slerp, variation_seeds
from ldm.models.diffusion.rng import (PhiloxGenerator, box_muller, cuda_randn_at, cuda_threads,
                                      philox_offset_increment, philox4x32)

# Random123 kat_vectors: rounds, counter (4 words), key (2 words) -> output (4 words)
PHILOX_KNOWN_ANSWERS = [
    (7, (0, 0, 0, 0), (0, 0), (0x5F6FB709, 0x0D893F64, 0x4F121F81, 0x4F730A48)),
    (7, (0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x5207DDC2, 0x45165E59, 0x4D8EE751, 0x8C52F662)),
    (7, (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0x4DFCCABA, 0x190A87F0, 0xC47362BA, 0xB6B5242A)),
    (10, (0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    (10, (0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (10, (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]

A1111_SEED0_3X4 = [[-0.92466259, -0.42534415, -2.6438457, 0.14518388],
                   [-0.12086647, -0.57972564, -0.62285122, -0.32838709],
                   [-1.07454231, -0.36314407, -1.67105067, 2.26550497]]
FLASHINFER_SEED42_2X5 = [[0.1940, 2.1614, -0.1721, 0.8491, -1.9244], [0.6530, -0.6494, -0.8175, 0.5280, -1.2753]]
FLASHINFER_SEED42_2X2 = [[0.1940, 2.1614], [-0.1721, 0.8491]]
# pytorch#158398: rows 0, 1, 2, 61, 62, 63 of [1, 64, 2048], columns 0, 1, 2, 2045, 2046, 2047
ISSUE_158398_SEED42 = [[0.1940, 2.1614, -0.1721, 1.4540, -2.7733, -0.8932],
                       [-0.4574, 0.8063, 0.1580, 0.1124, 0.2769, -1.2535],
                       [1.1346, -0.6329, -0.9147, -1.0001, -1.1552, -0.6955],
                       [-0.4861, 0.3358, 1.0578, -0.7282, 0.5087, 0.1318],
                       [0.7881, 0.8339, -1.1424, -0.6297, -1.1112, -0.4091],
                       [-1.2356, -0.4083, -0.4695, -0.4841, 1.2850, -0.0282]]
# pytorch#143086: seed 1, 9,483,264 elements: first three (both GPUs), last three on each
ISSUE_143086_NUMEL = 49 * 12 * 112 * 144
ISSUE_143086_FIRST = [-0.2963, 2.6764, -0.1408]
ISSUE_143086_LAST = {"H100": (132, [-0.6970, -0.7780, 0.3267]), "A100": (108, [0.1549, -0.6797, -0.1656])}
CONSECUTIVE_SEED42_DRAWS_OF_4 = [[0.1940, 2.1614, -0.1721, 0.8491], [0.1391, -0.1082, -0.7174, 0.7566],
                                 [-0.5187, 1.2268, 0.6255, -0.9117], [-0.6974, -1.8688, -0.8832, -1.6627],
                                 [-1.2682, -0.0383, -0.1029, 1.4400], [1.4640, -0.3238, 0.7740, 1.5892]]
PRINTED = 5.1e-5  # half a unit of the 4th decimal, and float32 rounding


@pytest.mark.parametrize("rounds, counter, key, expected", PHILOX_KNOWN_ANSWERS)
def test_philox4x32_known_answers(rounds, counter, key, expected):
    words = philox4x32([torch.tensor(word) for word in counter], [torch.tensor(word) for word in key], rounds)
    assert tuple(int(word) for word in words) == expected


def test_box_muller_is_curands():
    """u = (x + 1/2) 2^-32, theta = 2 pi (y + 1/2) 2^-32 with curand's float32 constants; the extremes stay finite."""
    x = torch.tensor([0, 1, 2**31, 2**32 - 1])
    y = torch.tensor([0, 2**30, 2**31, 2**32 - 1])
    sine, cosine = box_muller(x, y)
    u = (x.double() + 0.5) * 2.0**-32
    theta = (y.double() + 0.5) * 2.0**-32 * 2 * math.pi
    radius = torch.sqrt(-2 * torch.log(u))
    # curand's constants are float32 roundings of 2^-32 and 2 pi 2^-32: ~1e-7 off near sin = 0
    torch.testing.assert_close(sine.double(), radius * torch.sin(theta), rtol=2e-7, atol=3e-7)
    torch.testing.assert_close(cosine.double(), radius * torch.cos(theta), rtol=2e-7, atol=3e-7)
    assert sine.dtype == torch.float32 and bool(torch.isfinite(sine).all() and torch.isfinite(cosine).all())


def test_philox_randn_is_automatic1111s_documented_output():
    """AUTOMATIC1111's docstring prints 8 digits; CUDA's float32 logf/sinf and the float64 arithmetic here differ
    in the last units of float32 (at most 3 here)."""
    torch.testing.assert_close(philox_randn(0, (3, 4)), torch.tensor(A1111_SEED0_3X4), rtol=0, atol=3e-7)


def test_philox_randn_is_cudas_randn():
    torch.testing.assert_close(philox_randn(42, (2, 5)), torch.tensor(FLASHINFER_SEED42_2X5), rtol=0, atol=PRINTED)
    torch.testing.assert_close(philox_randn(42, (2, 2)), torch.tensor(FLASHINFER_SEED42_2X2), rtol=0, atol=PRINTED)
    first = cuda_randn_at(1, torch.arange(3), ISSUE_143086_NUMEL)
    torch.testing.assert_close(first, torch.tensor(ISSUE_143086_FIRST), rtol=0, atol=PRINTED)
    # one thread per element covers every SD latent: the first rows of a larger tensor are its own first draw
    full = philox_randn(42, (1, 64, 2048))[0]
    columns = [0, 1, 2, 2045, 2046, 2047]
    torch.testing.assert_close(full[:3][:, columns], torch.tensor(ISSUE_158398_SEED42[:3]), rtol=0, atol=PRINTED)


def test_large_tensors_follow_the_gpus_thread_count():
    """Past the GPU's thread capacity each thread draws several curand_normal4 blocks (cosine branches and later
    counters included), so the tail of a large tensor depends on the GPU; `threads` reproduces it."""
    for multiprocessors, last in ISSUE_143086_LAST.values():
        threads = cuda_threads(ISSUE_143086_NUMEL, multiprocessors)
        indices = torch.arange(ISSUE_143086_NUMEL - 3, ISSUE_143086_NUMEL)
        torch.testing.assert_close(cuda_randn_at(1, indices, ISSUE_143086_NUMEL, threads=threads),
                                   torch.tensor(last), rtol=0, atol=PRINTED)
    numel = 64 * 2048
    threads = cuda_threads(numel, multiprocessors=28, max_threads_per_multiprocessor=1536)
    assert threads == 168 * 256
    rows = torch.tensor([0, 1, 2, 61, 62, 63])[:, None] * 2048 + torch.tensor([0, 1, 2, 2045, 2046, 2047])
    torch.testing.assert_close(cuda_randn_at(42, rows.flatten(), numel, threads=threads).reshape(6, 6),
                               torch.tensor(ISSUE_158398_SEED42), rtol=0, atol=PRINTED)
    assert torch.equal(philox_randn(42, (4096,), threads=1024), cuda_randn_at(42, torch.arange(4096), 4096, 0, 1024))


def test_a_generator_continues_like_cudas():
    generator = PhiloxGenerator(42)
    draws = [generator.randn((4,)) for _ in CONSECUTIVE_SEED42_DRAWS_OF_4]
    torch.testing.assert_close(torch.stack(draws), torch.tensor(CONSECUTIVE_SEED42_DRAWS_OF_4), rtol=0, atol=PRINTED)
    assert torch.equal(draws[3], philox_randn(42, (4,), offset=3))
    assert philox_offset_increment(16384) == 1 and philox_offset_increment(16384, threads=1024) == 4
    capped = PhiloxGenerator(7, threads=1024)
    capped.randn((16384,))
    assert capped.offset == 4 and torch.equal(capped.randn((8,)), philox_randn(7, (8,), offset=4, threads=1024))


def test_seeds_are_torchs_64_bit_keys():
    """torch's manual_seed takes [-2^63, 2^64) and reads a negative seed by two's complement."""
    assert torch.equal(philox_randn(-1, (5,)), philox_randn(2**64 - 1, (5,)))
    assert not torch.equal(philox_randn(2**32 + 3, (5,)), philox_randn(3, (5,)))  # the key's high word counts
    with pytest.raises(ValueError, match="outside torch's range"):
        philox_randn(2**64, (1,))


# --- ImageNoise -----------------------------------------------------------------------------------------------------
def cpu_draws(seed: int, shape: tuple[int, ...], count: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for _ in range(count)]


def test_plain_image_noise_is_each_seeds_cpu_generator():
    seeds, shape = [42, 43, 2**40], (4, 6, 5)
    noise = ImageNoise(seeds)
    draws = [noise.randn((3, *shape)) for _ in range(3)]
    expected = [cpu_draws(seed, shape, 3) for seed in seeds]
    for step in range(3):
        assert torch.equal(draws[step], torch.stack([expected[image][step] for image in range(3)]))
    assert noise.randn_like(torch.zeros(3, *shape, dtype=torch.float64)).dtype == torch.float64
    assert [torch.randn(2, generator=g).shape for g in noise.generators] == [(2,)] * 3
    assert noise.brownian_seeds() == seeds


def test_ensd_reseeds_the_stream_after_the_starting_noise():
    """AUTOMATIC1111's eta noise seed delta: the starting noise is the seed's, every later draw (ancestral and SDE
    steps) comes from a generator seeded with seed + ENSD; the Brownian trees keep the seeds themselves."""
    seeds, shape, ensd = [20, 21], (4, 3, 3), 31337
    noise = ImageNoise(seeds, ensd=ensd)
    start, step1, step2 = (noise.randn((2, *shape)) for _ in range(3))
    assert torch.equal(start, torch.stack([cpu_draws(seed, shape, 1)[0] for seed in seeds]))
    later = [cpu_draws(seed + ensd, shape, 2) for seed in seeds]
    assert torch.equal(step1, torch.stack([draws[0] for draws in later]))
    assert torch.equal(step2, torch.stack([draws[1] for draws in later]))
    assert noise.brownian_seeds() == seeds
    nv = ImageNoise(seeds, rng="nv", ensd=-5)
    nv.randn((2, *shape))
    assert torch.equal(nv.randn((2, *shape)), torch.stack([philox_randn(seed - 5, shape) for seed in seeds]))


def test_nv_source_is_cudas_stream_per_image():
    seeds, shape = [1234, 5], (4, 8, 8)
    noise = ImageNoise(seeds, rng="NV")
    first, second = noise.randn((2, *shape)), noise.randn((2, *shape))
    assert torch.equal(first, torch.stack([philox_randn(seed, shape) for seed in seeds]))
    assert torch.equal(second, torch.stack([philox_randn(seed, shape, offset=1) for seed in seeds]))
    assert torch.equal(seeded_randn(0, (3, 4), "nv"), philox_randn(0, (3, 4)))
    assert torch.equal(seeded_randn(9, (3, 4), "cpu"), cpu_draws(9, (3, 4), 1)[0])
    with pytest.raises(ValueError, match="no torch.Generator"):
        _ = noise.generators


def test_random_source_is_checked():
    with pytest.raises(ValueError, match="unknown random source"):
        ImageNoise([1], rng="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="use 'nv'"):
            ImageNoise([1], rng="gpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the gpu source draws on a CUDA device")
def test_gpu_source_is_torch_on_the_cuda_device():
    noise = ImageNoise([3, 4], rng="gpu")
    drawn = noise.randn((2, 4, 8, 8), device="cpu")
    for image, seed in enumerate([3, 4]):
        generator = torch.Generator("cuda").manual_seed(seed)
        assert torch.equal(drawn[image], torch.randn((4, 8, 8), generator=generator, device="cuda").cpu())
        # on the sizes SD uses, torch's CUDA kernel is what the nv source emulates
        torch.testing.assert_close(drawn[image], philox_randn(seed, (4, 8, 8)), rtol=0, atol=1e-6)


def test_slerp_is_spherical_per_column():
    """Orthogonal unit columns: cos(t pi/2) low + sin(t pi/2) high; nearly parallel ones fall back to AUTOMATIC1111's
    linear blend, which weighs `low` by the strength."""
    low = torch.zeros(1, 2, 3)
    low[0, 0] = 1.0
    high = torch.zeros(1, 2, 3)
    high[0, 1] = 1.0
    mixed = slerp(0.3, low, high)
    torch.testing.assert_close(mixed, math.cos(0.3 * math.pi / 2) * low + math.sin(0.3 * math.pi / 2) * high)
    same = torch.randn(4, 8, 8)
    assert torch.equal(slerp(0.3, same, same * 1.0000001), same * 0.3 + same * 1.0000001 * 0.7)


def test_variation_seeds_are_numbered_as_automatic1111_does():
    assert variation_seeds(100, 3) == ([100, 101, 102], [0, 1, 2])
    assert variation_seeds(100, 3, subseed=7, subseed_strength=0.5) == ([100, 100, 100], [7, 8, 9])


# Image noise with AUTOMATIC1111's ImageRNG, whose formulas (modules/rng.py, v1.10) were re-typed from its source into a
# scratch script and run on the CPU: per image, flat elements 0, 1, 47, 100, 191 of a [4, 8, 6] first draw and the sum
VARIATION_KNOWN = {
    "cpu": [([0.03526785224676132, -1.4382350444793701, 0.8252412676811218, 0.5870795845985413, 0.892956018447876],
             -11.00557465851307),
            ([-0.041238222271203995, 0.096798837184906, 0.06941093504428864, 1.4927395582199097, 1.5985517501831055],
             -9.391147682443261)],
    "nv": [([-2.2939157485961914, 0.40152379870414734, -0.5287849307060242, 0.9844380617141724, -0.8066117763519287],
            -0.8230630420148373),
           ([-0.7573368549346924, -0.2428755760192871, -0.43805253505706787, 1.0979992151260376, -1.4103736877441406],
            3.16281552053988)],
}
RESIZE_KNOWN_CPU = ([2.8922135829925537, -0.5947133898735046, 1.062118649482727, 1.366084098815918, 2.073168992996216],
                    14.268495308235288)
RESIZE_VARIATION_KNOWN_NV = [
    ([-0.11997534334659576, -0.7125493884086609, 0.06599467992782593, 0.7695090174674988, -0.407184362411499],
     0.8915598927123938),
    ([-0.5630403161048889, -2.8970272541046143, 0.6177272796630859, -0.32115909457206726, -1.1012049913406372],
     -1.677696732338518)]
PICKS = [0, 1, 47, 100, 191]


def assert_known(noise: torch.Tensor, known: list[tuple[list[float], float]]) -> None:
    for image, (values, total) in zip(noise, known):
        assert image.flatten()[PICKS].tolist() == values
        assert float(image.double().sum()) == pytest.approx(total, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("rng", ["cpu", "nv"])
def test_variation_seed_noise_is_automatic1111s(rng):
    noise = ImageNoise([1234, 1234], rng=rng, subseeds=[99, 100], subseed_strength=0.3)
    assert_known(noise.randn((2, 4, 8, 6)), VARIATION_KNOWN[rng])


def test_variation_strength_ends():
    shape = (4, 8, 6)
    plain = ImageNoise([5]).randn((1, *shape))
    assert torch.equal(ImageNoise([5], subseeds=[7], subseed_strength=0.0).randn((1, *shape)), plain)
    # the seed as its own variation: parallel noise, blended linearly back into itself (to float32 rounding)
    torch.testing.assert_close(ImageNoise([5], subseeds=[5], subseed_strength=0.6).randn((1, *shape)), plain,
                               rtol=3e-7, atol=3e-7)
    full = ImageNoise([5], subseeds=[7], subseed_strength=1.0).randn((1, *shape))
    torch.testing.assert_close(full[0], cpu_draws(7, shape, 1)[0], rtol=1e-5, atol=1e-6)
    # a missing subseed counts as 0; the stream goes on after one draw of the image's own generator
    short = ImageNoise([5, 6], subseeds=[7], subseed_strength=0.5)
    short.randn((2, *shape))
    assert torch.equal(short.randn((2, *shape))[1], cpu_draws(6, shape, 2)[1])
    with pytest.raises(ValueError, match="subseed_strength"):
        ImageNoise([5], subseeds=[7], subseed_strength=1.5)


def test_resize_seed_from_is_automatic1111s():
    """96x40 pixels (12 x 5 latents) into 8 x 6: the seed's 12 x 5 noise, cut to its middle 8 rows, on columns 0..4;
    column 5 keeps the image generator's first draw."""
    noise = ImageNoise([11], seed_resize_from_w=40, seed_resize_from_h=96)
    first = noise.randn((1, 4, 8, 6))[0]
    assert_known(first[None], [RESIZE_KNOWN_CPU])
    small = cpu_draws(11, (4, 12, 5), 1)[0]
    assert torch.equal(first[:, :, :5], small[:, 2:10, :])
    assert torch.equal(first[:, :, 5], cpu_draws(11, (4, 8, 6), 1)[0][:, :, 5])
    assert torch.equal(noise.randn((1, 4, 8, 6))[0], cpu_draws(11, (4, 8, 6), 2)[1])
    # a smaller source centred on the canvas, with a variation seed, in the nv source
    mixed = ImageNoise([11, 12], rng="nv", subseeds=[3, 4], subseed_strength=0.5, seed_resize_from_w=72,
                       seed_resize_from_h=24)
    assert_known(mixed.randn((2, 4, 8, 6)), RESIZE_VARIATION_KNOWN_NV)


def test_plain_noise_is_unchanged_by_default_options():
    seeds, shape = [3, 9], (4, 5, 7)
    reference, configured = ImageNoise(seeds), ImageNoise(seeds, rng="cpu", ensd=0, subseeds=[1, 2],
                                                           subseed_strength=0.0, seed_resize_from_w=0)
    for _ in range(3):
        assert torch.equal(reference.randn((2, *shape)), configured.randn((2, *shape)))
