"""The autoencoder's posterior: a Gaussian with diagonal covariance over the latent pixels."""
from __future__ import annotations

import math
from typing import Sequence

import torch


class DiagonalGaussianDistribution:
    """N(mean, exp(logvar)) with `parameters` = cat([mean, logvar], dim=1), as the KL encoder emits them.

    `logvar` is clamped to [-30, 20] so that `std` and `var` stay finite. With `deterministic` the variance is
    zero: `sample()` returns the mean and `kl()` / `nll()` are zero.
    """

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False):
        if parameters.shape[1] % 2 != 0:
            raise ValueError(f"parameters need an even number of channels (mean and logvar), got shape "
                             f"{tuple(parameters.shape)}")
        self.parameters = parameters
        self.deterministic = deterministic
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        if deterministic:
            self.std = torch.zeros_like(self.mean)
            self.var = torch.zeros_like(self.mean)
        else:
            self.std = torch.exp(0.5 * self.logvar)
            self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std * noise; noise is drawn in float32 on the CPU, so a seed gives the same latent on any device.

        Without a generator the noise comes from torch's global CPU generator, for CompVis-style callers that seed
        globally; pass a `torch.Generator` to keep randomness explicit.
        """
        if generator is not None and generator.device.type != "cpu":
            raise ValueError(f"sample() draws its noise on the CPU so that it does not depend on the device; pass a "
                             f"CPU torch.Generator, not one on {generator.device}")
        noise = torch.randn(self.mean.shape, generator=generator, dtype=torch.float32, device="cpu")
        noise = noise.to(device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * noise

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self, other: "DiagonalGaussianDistribution | None" = None) -> torch.Tensor:
        """KL(self || other) summed over (c, h, w), one value per batch item; `other` defaults to N(0, I)."""
        if self.deterministic:
            return torch.zeros(1, device=self.mean.device, dtype=self.mean.dtype)
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])
        return 0.5 * torch.sum(
            (self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0 - self.logvar + other.logvar,
            dim=[1, 2, 3],
        )

    def nll(self, sample: torch.Tensor, dims: Sequence[int] = (1, 2, 3)) -> torch.Tensor:
        """Negative log-likelihood of `sample`, summed over `dims`."""
        if self.deterministic:
            return torch.zeros(1, device=self.mean.device, dtype=self.mean.dtype)
        return 0.5 * torch.sum(
            math.log(2.0 * math.pi) + self.logvar + (sample - self.mean).pow(2) / self.var,
            dim=list(dims),
        )
