"""First-stage models of latent diffusion: the KL autoencoder and the identity stage (inference only)."""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.optimize.vae import VaeTiling, decode_tiled


class AutoencoderKL(nn.Module):
    """Image <-> latent autoencoder with a Gaussian posterior (Rombach et al. 2022, "KL-reg" first stage).

    `ddconfig` is the yaml's shared encoder/decoder config; `embed_dim` is the latent's channel count. Inputs are
    cast to the weights' dtype, so an fp16 model accepts float32 images and latents.
    """

    def __init__(self, ddconfig: Mapping[str, Any], embed_dim: int):
        super().__init__()
        if not ddconfig.get("double_z", True):
            raise ValueError("AutoencoderKL needs ddconfig double_z: true (the encoder must emit mean and logvar); "
                             f"got double_z={ddconfig['double_z']!r}")
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        z_channels = ddconfig["z_channels"]
        self.quant_conv = nn.Conv2d(2 * z_channels, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z_channels, 1)
        self.embed_dim = embed_dim
        # memory modes, set by ldm.optimize.enable_vae_tiling / enable_vae_slicing
        self.tiling: VaeTiling | None = None
        self.decode_one_at_a_time = False

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        """Images (b, in_channels, H, W) in [-1, 1] -> posterior over latents (b, embed_dim, H/f, W/f)."""
        x = x.to(self.quant_conv.weight.dtype)
        moments = self.quant_conv(self.encoder(x))
        return DiagonalGaussianDistribution(moments)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latents (b, embed_dim, h, w) -> images (b, out_ch, h*f, w*f), roughly in [-1, 1]."""
        z = z.to(self.post_quant_conv.weight.dtype)
        if self.decode_one_at_a_time and z.shape[0] > 1:
            return torch.cat([self._decode(one) for one in z.split(1)])
        return self._decode(z)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        z = self.post_quant_conv(z)
        if self.tiling is not None and max(z.shape[-2:]) > self.tiling.tile:
            return decode_tiled(self.decoder, z, self.tiling)
        return self.decoder(z)

    def forward(self, input: torch.Tensor, sample_posterior: bool = True,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussianDistribution]:
        """Reconstruct `input` through a sampled (or, without `sample_posterior`, the mean) latent."""
        posterior = self.encode(input)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior


class IdentityFirstStage(nn.Module):
    """A first stage that leaves its input unchanged, for diffusion directly in pixel space."""

    def __init__(self, *, vq_interface: bool = False):
        super().__init__()
        self.vq_interface = vq_interface

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def quantize(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, None, list[None]]:
        """`x`, or with `vq_interface` the (quant, loss, info) triple a VQ model returns."""
        if self.vq_interface:
            return x, None, [None, None, None]
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x
