"""CUDA's `torch.randn` on any device: the Philox4x32-10 counter-based generator and curand's Box-Muller transform.

torch draws normal noise on a CUDA device with a kernel in which thread i (of `threads`) seeds curand's Philox
state with key = seed, subsequence = i, offset = the generator's offset, and each `curand_normal4` call turns one
Philox block (four 32-bit words) into four normals: the sine and cosine Box-Muller branches of words (0, 1), then
of words (2, 3). Element li of the flat output is element q % 4 of call q // 4 of thread li % threads, where
q = li // threads. When there are at least as many threads as elements (the kernel launches one per element up to
the GPU's capacity: multiprocessors x max threads per multiprocessor, about 200,000 on current GPUs, so every
Stable Diffusion latent), element i is simply the sine branch of Philox(counter = (offset, i), key = seed): what
AUTOMATIC1111's "NV" random source computes (modules/rng_philox.py). Larger tensors depend on the GPU; pass its
`threads` (`cuda_threads`) to reproduce them.

The Box-Muller arithmetic follows AUTOMATIC1111's emulation (curand's float32 constants, float64 logarithm and sine,
rounded once to float32); CUDA's own `logf`/`sinf` are within a few float32 units in the last place of it.
Tested against the Random123 known-answer vectors and published CUDA outputs (tests/test_rng.py).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

PHILOX_M = (0xD2511F53, 0xCD9E8D57)  # the round multipliers of Philox4x32 (Salmon et al. 2011)
PHILOX_W = (0x9E3779B9, 0xBB67AE85)  # the Weyl key increments: the golden ratio and sqrt(3) - 1, in 32 bits
_MASK = 0xFFFFFFFF
# curand's CURAND_2POW32_INV and CURAND_2POW32_INV_2PI, as float32 numbers
_TWO_POW32_INV = float(torch.tensor(2.3283064e-10, dtype=torch.float32))
_TWO_POW32_INV_2PI = float(torch.tensor(2.3283064e-10 * 6.2831855, dtype=torch.float32))
_CHUNK = 1 << 20  # elements per pass, to bound memory on large tensors
_BLOCK_SIZE = 256  # torch's threads per block for its random kernels


def _mulhilo(a: torch.Tensor, multiplier: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The high and low 32-bit words of a * multiplier for 32-bit `a` (int64 tensors), exactly: split in 16-bit
    halves so no product passes 2^49."""
    low_product, high_product = (a & 0xFFFF) * multiplier, (a >> 16) * multiplier
    low = (low_product + ((high_product & 0xFFFF) << 16)) & _MASK
    high = (high_product + (low_product >> 16)) >> 16
    return high, low


def philox4x32(counter: Sequence[torch.Tensor], key: Sequence[torch.Tensor],
               rounds: int = 10) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Philox4x32 block function (Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3") of four
    32-bit counter words and two key words (int64 tensors holding values below 2^32, broadcast together); rounds=10
    is curand's and torch's Philox4x32-10."""
    c0, c1, c2, c3 = (torch.as_tensor(word, dtype=torch.int64) for word in counter)
    k0, k1 = (torch.as_tensor(word, dtype=torch.int64) for word in key)
    for round_index in range(rounds):
        if round_index:
            k0, k1 = (k0 + PHILOX_W[0]) & _MASK, (k1 + PHILOX_W[1]) & _MASK
        high0, low0 = _mulhilo(c0, PHILOX_M[0])
        high1, low1 = _mulhilo(c2, PHILOX_M[1])
        c0, c1, c2, c3 = high1 ^ c1 ^ k0, low1, high0 ^ c3 ^ k1, low0
    return c0, c1, c2, c3


def box_muller(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """curand's Box-Muller transform of two 32-bit words: (r sin(theta), r cos(theta)) in float32, with
    u = (x + 1/2) / 2^32 in (0, 1), r = sqrt(-2 ln u) and theta = 2 pi (y + 1/2) / 2^32."""
    u = x.double() * _TWO_POW32_INV + _TWO_POW32_INV / 2
    theta = y.double() * _TWO_POW32_INV_2PI + _TWO_POW32_INV_2PI / 2
    radius = torch.sqrt(-2.0 * torch.log(u))
    return (radius * torch.sin(theta)).float(), (radius * torch.cos(theta)).float()


def cuda_threads(numel: int, multiprocessors: int, max_threads_per_multiprocessor: int = 2048) -> int:
    """The threads torch's CUDA random kernels launch for `numel` elements on a GPU with `multiprocessors` SMs: one
    256-thread block per 256 elements, at most as many blocks as the GPU holds at once (e.g. H100 SXM: 132 SMs x
    2048; A100: 108 x 2048; RTX 3060: 28 x 1536)."""
    blocks = min(-(-numel // _BLOCK_SIZE), multiprocessors * (max_threads_per_multiprocessor // _BLOCK_SIZE))
    return max(blocks, 1) * _BLOCK_SIZE


def philox_offset_increment(numel: int, threads: int | None = None) -> int:
    """How far one `torch.randn` of `numel` elements advances the CUDA generator, in Philox blocks (torch's offset
    counts words: four times this): one block per `curand_normal4` call of each thread."""
    if numel == 0:
        return 0
    threads = numel if threads is None else threads
    return (numel - 1) // (threads * 4) + 1


def cuda_randn_at(seed: int, indices: torch.Tensor, numel: int, offset: int = 0,
                  threads: int | None = None) -> torch.Tensor:
    """Elements `indices` (int64) of the flat float32 `torch.randn(numel)` a CUDA generator seeded with `seed`
    gives at Philox block `offset` (0 for its first draw), computed on the CPU; `threads` as in the module docstring
    (None: one per element)."""
    threads = max(numel, 1) if threads is None else threads
    seed = _as_uint64(seed)
    indices = torch.as_tensor(indices, dtype=torch.int64)
    thread, call_and_word = indices % threads, indices // threads
    block = offset + call_and_word // 4
    words = philox4x32((block & _MASK, block >> 32, thread & _MASK, thread >> 32),
                       (torch.full_like(indices, seed & _MASK), torch.full_like(indices, seed >> 32)))
    sin01, cos01 = box_muller(words[0], words[1])
    sin23, cos23 = box_muller(words[2], words[3])
    branch = call_and_word % 4
    return torch.where(branch == 0, sin01, torch.where(branch == 1, cos01, torch.where(branch == 2, sin23, cos23)))


def philox_randn(seed: int, shape: Sequence[int], offset: int = 0, threads: int | None = None) -> torch.Tensor:
    """float32 CPU noise equal to `torch.manual_seed(seed); torch.randn(shape, device="cuda")` (the first draw;
    `offset` > 0: a later draw of that generator, see `PhiloxGenerator`)."""
    shape = tuple(int(size) for size in shape)
    numel = math.prod(shape)
    chunks = [cuda_randn_at(seed, torch.arange(start, min(start + _CHUNK, numel)), numel, offset, threads)
              for start in range(0, numel, _CHUNK)]
    return (torch.cat(chunks) if chunks else torch.empty(0)).reshape(shape)


class PhiloxGenerator:
    """A CUDA `torch.Generator` seeded with `seed`, emulated on the CPU: each `randn` continues where the last
    left off, as torch's draws on one CUDA generator do (AUTOMATIC1111's `rng_philox.Generator`)."""

    def __init__(self, seed: int, threads: int | None = None):
        self.seed = _as_uint64(seed)
        self.threads = threads
        self.offset = 0  # Philox blocks used so far

    def randn(self, shape: Sequence[int]) -> torch.Tensor:
        noise = philox_randn(self.seed, shape, self.offset, self.threads)
        self.offset += philox_offset_increment(noise.numel(), self.threads)
        return noise


def _as_uint64(seed: int) -> int:
    """`seed` as the unsigned 64-bit key torch's `manual_seed` makes of it (a negative seed by two's complement)."""
    seed = int(seed)
    if not -(2**63) <= seed < 2**64:
        raise ValueError(f"seed {seed} is outside torch's range [-2^63, 2^64)")
    return seed % 2**64
