"""Brownian-tree noise (ldm/models/diffusion/brownian.py): torchsde's BrownianTree as k-diffusion's
BrownianTreeNoiseSampler wraps it, one tree per image seed, and the law of its increments."""
from __future__ import annotations

import pytest
import torch
import torchsde

from ldm.models.diffusion.brownian import BrownianTreeNoiseSampler

SHAPE = (2, 4, 8, 8)
SIGMA_MIN, SIGMA_MAX = torch.tensor(0.0292), torch.tensor(14.6146)


def torchsde_increment(seed: int, shape: tuple[int, ...], t0: torch.Tensor, t1: torch.Tensor) -> torch.Tensor:
    """torchsde directly, built as k-diffusion builds it: float32 tensor times, zeros w0, the seed as entropy."""
    tree = torchsde.BrownianTree(SIGMA_MIN, torch.zeros(shape), SIGMA_MAX, entropy=seed)
    low, high = sorted((t0, t1))
    return tree(low, high) * (1 if t0 < t1 else -1) / (t1 - t0).abs().sqrt()


def test_each_image_gets_the_tree_of_its_seed():
    x = torch.zeros(SHAPE)
    sampler = BrownianTreeNoiseSampler(x, SIGMA_MIN, SIGMA_MAX, seed=[5, 6])
    sigma, sigma_next = torch.tensor(7.0), torch.tensor(3.0)
    noise = sampler(sigma, sigma_next)
    for k, seed in enumerate((5, 6)):
        assert torch.equal(noise[k], torchsde_increment(seed, SHAPE[1:], sigma, sigma_next))
    alone = BrownianTreeNoiseSampler(x[1:], SIGMA_MIN, SIGMA_MAX, seed=[6])(sigma, sigma_next)
    assert torch.equal(alone[0], noise[1])


def test_one_seed_gives_one_tree_for_the_batch():
    x = torch.zeros(SHAPE)
    noise = BrownianTreeNoiseSampler(x, SIGMA_MIN, SIGMA_MAX, seed=5)(torch.tensor(7.0), torch.tensor(3.0))
    assert torch.equal(noise, torchsde_increment(5, SHAPE, torch.tensor(7.0), torch.tensor(3.0)))


def test_the_path_does_not_depend_on_the_queries_before():
    """A tree's increment over an interval is the same whatever was asked before (a step count changes the queries
    but not the path), and going up an interval is going down it negated."""
    x = torch.zeros(SHAPE)
    first = BrownianTreeNoiseSampler(x, SIGMA_MIN, SIGMA_MAX, seed=[5, 6])
    second = BrownianTreeNoiseSampler(x, SIGMA_MIN, SIGMA_MAX, seed=[5, 6])
    for a, b in ((14.6, 9.0), (9.0, 4.0), (4.0, 1.0)):
        second(torch.tensor(a), torch.tensor(b))
    wanted = first(torch.tensor(2.0), torch.tensor(0.5))
    assert torch.equal(second(torch.tensor(2.0), torch.tensor(0.5)), wanted)
    assert torch.equal(first(torch.tensor(0.5), torch.tensor(2.0)), -wanted)


def test_increments_have_the_law_of_one_brownian_path():
    """Normalized increments are standard normal, and those over [s, m] and [s, b] (m between) share the path:
    correlation sqrt((s - m) / (s - b)). Independent draws, the easy mistake, would have correlation 0."""
    x = torch.zeros(64, 8, 8, 8)
    sampler = BrownianTreeNoiseSampler(x, SIGMA_MIN, SIGMA_MAX, seed=list(range(64)))
    s, m, b = torch.tensor(6.0), torch.tensor(5.0), torch.tensor(2.0)
    whole, part = sampler(s, b).flatten(), sampler(s, m).flatten()
    assert abs(float(whole.mean())) < 0.03 and abs(float(whole.std()) - 1) < 0.03
    correlation = float(torch.corrcoef(torch.stack([whole, part]))[0, 1])
    assert correlation == pytest.approx(((s - m) / (s - b)).sqrt().item(), abs=0.03)
    later = sampler(b, torch.tensor(1.0)).flatten()  # a disjoint interval: independent
    assert abs(float(torch.corrcoef(torch.stack([whole, later]))[0, 1])) < 0.03


def test_noise_comes_back_like_x():
    x = torch.zeros(SHAPE, dtype=torch.float64)
    noise = BrownianTreeNoiseSampler(x, SIGMA_MIN, SIGMA_MAX, seed=[5, 6])(torch.tensor(7.0), torch.tensor(3.0))
    assert noise.dtype == torch.float64 and noise.shape == SHAPE and noise.device == x.device


def test_another_random_source_replaces_the_trees_draws():
    """`randn(seed, shape)` stands in for torchsde's generator: torch's CPU generator gives the default trees back,
    another source other trees; torch.randn outside the trees is untouched."""
    x = torch.zeros(SHAPE)
    sigma, sigma_next = torch.tensor(7.0), torch.tensor(3.0)
    default = BrownianTreeNoiseSampler(x, SIGMA_MIN, SIGMA_MAX, seed=[5, 6])(sigma, sigma_next)

    def cpu(seed, shape):
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed))

    def shifted(seed, shape):
        return cpu(seed + 1, shape)

    same = BrownianTreeNoiseSampler(x, SIGMA_MIN, SIGMA_MAX, seed=[5, 6], randn=cpu)(sigma, sigma_next)
    assert torch.equal(same, default)
    other = BrownianTreeNoiseSampler(x, SIGMA_MIN, SIGMA_MAX, seed=[5, 6], randn=shifted)
    assert (other(sigma, sigma_next) - default).abs().mean() > 0.1
    torch.manual_seed(0)
    plain = torch.randn(3)
    torch.manual_seed(0)
    other(torch.tensor(9.0), torch.tensor(8.0))
    assert torch.equal(torch.randn(3), plain)


def test_seeds_must_match_the_batch():
    with pytest.raises(ValueError, match="one seed per image"):
        BrownianTreeNoiseSampler(torch.zeros(SHAPE), SIGMA_MIN, SIGMA_MAX, seed=[1, 2, 3])


def test_no_seed_takes_one_from_torchs_global_generator():
    x = torch.zeros(SHAPE)
    torch.manual_seed(3)
    first = BrownianTreeNoiseSampler(x, SIGMA_MIN, SIGMA_MAX)(torch.tensor(7.0), torch.tensor(3.0))
    torch.manual_seed(3)
    assert torch.equal(BrownianTreeNoiseSampler(x, SIGMA_MIN, SIGMA_MAX)(torch.tensor(7.0), torch.tensor(3.0)), first)
