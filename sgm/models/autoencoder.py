"""sgm's KL autoencoder names: the SDXL VAE has the CompVis layout (`encoder.*`, `decoder.*`, `quant_conv`,
`post_quant_conv`), so `ldm`'s AutoencoderKL is used under both of generative-models' class names."""
from __future__ import annotations

from ldm.models.autoencoder import AutoencoderKL


class AutoencoderKLInferenceWrapper(AutoencoderKL):
    """Older generative-models configs' name for the inference-only KL autoencoder; the same model."""


__all__ = ["AutoencoderKL", "AutoencoderKLInferenceWrapper"]
