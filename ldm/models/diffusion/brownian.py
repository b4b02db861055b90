"""Noise samplers for the k-diffusion samplers: `noise_sampler(sigma, sigma_next)` returns standard normal noise shaped
like the latents, for the step from `sigma` to `sigma_next`.

`BrownianTreeNoiseSampler` is k-diffusion's noise for its SDE samplers (DPM++ SDE, DPM++ 2M SDE, DPM++ 3M SDE): the
normalized increment (W(t1) - W(t0)) / sqrt|t1 - t0| of one Brownian motion W over the noise levels, drawn from
torchsde's `BrownianTree` (Li et al. 2020, "Scalable gradients for stochastic differential equations"). Increments
over overlapping intervals are correlated as those of one path are, and the path depends only on the seed and the
interval [sigma_min, sigma_max], not on the steps that query it, so a seed gives the same motion at any step count.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, ContextManager, Sequence

import torch
from torch.overrides import TorchFunctionMode

NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# (seed, shape) -> float32 standard normal noise of that shape: a random source for the tree's draws
RandnSource = Callable[[int, tuple[int, ...]], torch.Tensor]


def default_noise_sampler(x: torch.Tensor) -> NoiseSampler:
    """k-diffusion's default: fresh `torch.randn_like(x)` at each call, from torch's global generator. The sampler
    registry never uses it (it passes each image's own stream); it gives `noise_sampler=None` k-diffusion's meaning."""
    return lambda sigma, sigma_next: torch.randn_like(x)


class _SeededRandn(TorchFunctionMode):
    """Within it, `torch.randn(size, ..., generator=g)` returns `randn(g.initial_seed(), size)` in the dtype and on the
    device asked for. torchsde seeds a fresh generator for every draw of its tree, so this swaps the tree's random
    source, as AUTOMATIC1111 does for its GPU and NV random sources, without touching torchsde itself."""

    def __init__(self, randn: RandnSource):
        super().__init__()
        self.randn = randn

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.randn and kwargs.get("generator") is not None:
            size = tuple(args[0]) if len(args) == 1 and not isinstance(args[0], int) else tuple(args)
            values = self.randn(int(kwargs["generator"].initial_seed()), size)
            return values.to(dtype=kwargs.get("dtype") or torch.get_default_dtype(), device=kwargs.get("device"))
        return func(*args, **kwargs)


class BatchedBrownianTree:
    """torchsde `BrownianTree`s over [t0, t1] (in either order) on the CPU: one per image for a list of seeds (each
    shaped like one image of `x`), or one for the whole of `x` for a single seed (None: drawn from torch's global
    generator, as k-diffusion does). `randn`, when given, replaces the trees' CPU generator draws."""

    def __init__(self, x: torch.Tensor, t0: torch.Tensor, t1: torch.Tensor, seed: int | Sequence[int] | None = None,
                 randn: RandnSource | None = None):
        try:
            import torchsde
        except ImportError as error:
            raise ImportError("the Brownian-tree noise of the SDE samplers needs torchsde: pip install torchsde") \
                from error
        (t0, t1), self.sign = sorted((t0, t1)), (1 if t0 < t1 else -1)
        if seed is None:
            seed = int(torch.randint(0, 2**63 - 1, []).item())
        self.batched = not isinstance(seed, int)
        seeds = list(seed) if self.batched else [seed]
        if self.batched and len(seeds) != x.shape[0]:
            raise ValueError(f"{len(seeds)} seeds for a batch of {x.shape[0]}: give one seed per image, or one int "
                             "for the whole batch")
        w0 = torch.zeros(x.shape[1:] if self.batched else x.shape, dtype=x.dtype)
        self.randn = randn
        with self._random_source():
            self.trees = [torchsde.BrownianTree(t0, w0, t1, entropy=int(s)) for s in seeds]

    def _random_source(self) -> ContextManager:
        return _SeededRandn(self.randn) if self.randn is not None else contextlib.nullcontext()

    def __call__(self, t0: torch.Tensor, t1: torch.Tensor) -> torch.Tensor:
        """W(t1) - W(t0) for every tree, stacked over the batch for a list of seeds."""
        sign = 1 if t0 < t1 else -1
        t0, t1 = sorted((t0, t1))
        with self._random_source(), warnings.catch_warnings():
            # torchsde clamps a query a rounding error past the end of its interval, and warns each time
            warnings.filterwarnings("ignore", message="Should have t", module="torchsde")
            w = torch.stack([tree(t0, t1) for tree in self.trees]) * (self.sign * sign)
        return w if self.batched else w[0]


class BrownianTreeNoiseSampler:
    """k-diffusion's noise sampler backed by torchsde's `BrownianTree`, valid for sigmas in [sigma_min, sigma_max].

    `seed`: an int (one tree for the batch), a list of ints (one tree per image, each seeded with its own seed: what
    AUTOMATIC1111 passes, the batch's image seeds), or None (a seed from torch's global generator). `transform` maps
    sigma to the tree's time. The trees live on the CPU and draw from torch's CPU generator (AUTOMATIC1111's "CPU"
    random source); `randn(seed, shape)` swaps in another source (its "GPU" or "NV" one). Noise comes back on `x`'s
    device, in `x`'s dtype.
    """

    def __init__(self, x: torch.Tensor, sigma_min: float | torch.Tensor, sigma_max: float | torch.Tensor,
                 seed: int | Sequence[int] | None = None,
                 transform: Callable[[torch.Tensor], torch.Tensor] = lambda sigma: sigma,
                 randn: RandnSource | None = None):
        self.transform = transform
        self.device = x.device
        t0, t1 = self._time(sigma_min), self._time(sigma_max)
        self.tree = BatchedBrownianTree(x, t0, t1, seed, randn=randn)

    def _time(self, sigma: float | torch.Tensor) -> torch.Tensor:
        return self.transform(torch.as_tensor(sigma).detach().cpu())

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        t0, t1 = self._time(sigma), self._time(sigma_next)
        return (self.tree(t0, t1) / (t1 - t0).abs().sqrt()).to(self.device)
