"""Stand-ins with the `LatentDiffusion` sampling interface, for sampler tests that need no UNet.

`GaussianDataDiffusion` predicts exactly what a perfect model of Gaussian data N(mu, std^2) would, so deterministic
samplers have a known answer (the probability-flow ODE solution) to converge to.
"""
from __future__ import annotations

import torch
from torch import nn


def scaled_linear_alphas_cumprod(timesteps: int = 1000, linear_start: float = 0.00085,
                                 linear_end: float = 0.012) -> torch.Tensor:
    betas = torch.linspace(linear_start**0.5, linear_end**0.5, timesteps, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


class ToyDiffusion(nn.Module):
    """The schedule buffers and helpers of `LatentDiffusion`; subclasses define `model_output`."""

    def __init__(self, parameterization: str = "eps", timesteps: int = 1000):
        super().__init__()
        self.parameterization = parameterization
        self.num_timesteps = timesteps
        alphas_cumprod = scaled_linear_alphas_cumprod(timesteps)
        alphas_cumprod_prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
        betas = 1.0 - alphas_cumprod / alphas_cumprod_prev
        for name, value in {
            "betas": betas, "alphas_cumprod": alphas_cumprod, "alphas_cumprod_prev": alphas_cumprod_prev,
            "sqrt_alphas_cumprod": alphas_cumprod.sqrt(), "sqrt_one_minus_alphas_cumprod": (1 - alphas_cumprod).sqrt(),
            "sqrt_recip_alphas_cumprod": alphas_cumprod.rsqrt(),
            "sqrt_recipm1_alphas_cumprod": (1 / alphas_cumprod - 1).sqrt(),
        }.items():
            self.register_buffer(name, value.float())
        self.calls = 0

    @property
    def device(self) -> torch.device:
        return self.betas.device

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    def _at(self, buffer: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return buffer[t.long()].reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)

    def predict_eps_from_z_and_v(self, x_t, t, v):
        return self._at(self.sqrt_alphas_cumprod, t, x_t) * v + self._at(self.sqrt_one_minus_alphas_cumprod, t, x_t) * x_t

    def predict_start_from_z_and_v(self, x_t, t, v):
        return self._at(self.sqrt_alphas_cumprod, t, x_t) * x_t - self._at(self.sqrt_one_minus_alphas_cumprod, t, x_t) * v

    def predict_start_from_noise(self, x_t, t, noise):
        return self._at(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - self._at(self.sqrt_recipm1_alphas_cumprod, t, x_t) * noise

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        self.calls += 1
        eps, x0 = self.predict(x, t, cond)
        if self.parameterization == "eps":
            return eps
        a, s = self._at(self.sqrt_alphas_cumprod, t, x), self._at(self.sqrt_one_minus_alphas_cumprod, t, x)
        return a * eps - s * x0  # v = sqrt(a) eps - sqrt(1 - a) x0


class GaussianDataDiffusion(ToyDiffusion):
    """Exact eps/x0 for data x0 ~ N(mu + cond, std^2): E[eps | x_t] = sqrt(1-a) (x_t - sqrt(a) m) / (a std^2 + 1 - a)."""

    def __init__(self, mu: float = 0.5, std: float = 0.5, parameterization: str = "eps"):
        super().__init__(parameterization)
        self.mu, self.std = mu, std

    def predict(self, x, t, cond):
        mean = self.mu + (cond.reshape(-1, *([1] * (x.ndim - 1))) if torch.is_tensor(cond) else 0.0)
        a = self._at(self.alphas_cumprod, t, x)
        eps = (1 - a).sqrt() * (x - a.sqrt() * mean) / (a * self.std**2 + 1 - a)
        return eps, (x - (1 - a).sqrt() * eps) / a.sqrt()


class NonlinearToyDiffusion(ToyDiffusion):
    """A fixed random nonlinear function of (x, t, cond): for comparing samplers step by step, not convergence."""

    def __init__(self, channels: int = 4, cond_dim: int = 8, parameterization: str = "eps", seed: int = 0):
        super().__init__(parameterization)
        g = torch.Generator().manual_seed(seed)
        self.register_buffer("w", torch.randn(channels, channels, generator=g) * 0.3)
        self.register_buffer("c", torch.randn(cond_dim, channels, generator=g) * 0.3)

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, cond) -> torch.Tensor:
        """The same bounded function read as eps or as v, whichever the parameterization says."""
        self.calls += 1
        tt = (t.float() / self.num_timesteps).reshape(-1, 1, 1, 1)
        h = torch.einsum("bchw,cd->bdhw", x, self.w)
        if torch.is_tensor(cond):  # cond [B, tokens, cond_dim] like cross-attention context
            h = h + (cond.mean(1) @ self.c)[:, :, None, None]
        return torch.tanh(h + tt) + 0.1 * x


class ContinuousGaussianData(GaussianDataDiffusion):
    """The exact Gaussian-data model at fractional timesteps too (log sigma interpolated, as `t_to_sigma` does),
    so midpoint evaluations are exact as well."""

    def predict(self, x, t, cond):
        log_sigmas = (((1 - self.alphas_cumprod) / self.alphas_cumprod) ** 0.5).log()
        t = t.to(log_sigmas.dtype)
        low = t.floor().long().clamp(0, len(log_sigmas) - 1)
        sigma = torch.lerp(log_sigmas[low], log_sigmas[t.ceil().long()], t - low).exp()
        a = (1 / (1 + sigma**2)).reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)
        mean = self.mu + cond.reshape(-1, *([1] * (x.ndim - 1)))
        eps = (1 - a).sqrt() * (x - a.sqrt() * mean) / (a * self.std**2 + 1 - a)
        return eps, (x - (1 - a).sqrt() * eps) / a.sqrt()
