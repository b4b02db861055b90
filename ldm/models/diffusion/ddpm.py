"""`LatentDiffusion`: the CompVis inference API (conditioning, denoiser call, first-stage encode/decode).

Training lives elsewhere; this class carries the schedule and the three sub-models under the attribute names of the
released checkpoints: `model.diffusion_model` (UNet), `first_stage_model` (autoencoder), `cond_stage_model` (text).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ldm.modules.diffusionmodules.util import diffusion_schedule, make_beta_schedule
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.util import instantiate_from_config

CONDITIONING_KEYS = (None, "concat", "crossattn", "hybrid", "adm", "hybrid-adm", "crossattn-adm")
PARAMETERIZATIONS = ("eps", "x0", "v")


def extract_into_tensor(buffer: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`buffer[t]` shaped [B, 1, 1, ...] to broadcast against `x`, in x's dtype."""
    return buffer.to(x.device)[t.long()].reshape(-1, *([1] * (x.ndim - 1))).to(x.dtype)


class DiffusionWrapper(nn.Module):
    """Holds the UNet as `diffusion_model` and routes conditioning to it as CompVis does."""

    def __init__(self, diff_model_config: Mapping[str, Any], conditioning_key: str | None):
        super().__init__()
        if conditioning_key not in CONDITIONING_KEYS:
            raise ValueError(f"conditioning_key {conditioning_key!r} is not one of {CONDITIONING_KEYS}")
        self.diffusion_model = instantiate_from_config(diff_model_config)
        self.conditioning_key = conditioning_key

    def forward(self, x: torch.Tensor, t: torch.Tensor, c_concat: Sequence[torch.Tensor] | None = None,
                c_crossattn: Sequence[torch.Tensor] | None = None, c_adm: torch.Tensor | None = None,
                c_timestep: torch.Tensor | None = None) -> torch.Tensor:
        """`c_timestep`: a latent consistency model's guidance embedding, for UNets that take one."""
        key = self.conditioning_key
        extra = {} if c_timestep is None else {"timestep_cond": c_timestep}
        if key in ("concat", "hybrid", "hybrid-adm"):
            x = torch.cat([x, *c_concat], dim=1)
        context = torch.cat(list(c_crossattn), dim=1) if key in ("crossattn", "hybrid", "hybrid-adm",
                                                                 "crossattn-adm") else None
        if key == "adm":
            return self.diffusion_model(x, t, y=c_crossattn[0], **extra)
        if key in ("hybrid-adm", "crossattn-adm"):
            return self.diffusion_model(x, t, context=context, y=c_adm, **extra)
        return self.diffusion_model(x, t, context=context, **extra)


class LatentDiffusion(nn.Module):
    """Stable Diffusion for inference, built from the `params` of a released yaml config."""

    def __init__(self, unet_config: Mapping[str, Any], first_stage_config: Mapping[str, Any],
                 cond_stage_config: Mapping[str, Any] | str, conditioning_key: str | None = "crossattn",
                 timesteps: int = 1000, beta_schedule: str = "linear", linear_start: float = 1e-4,
                 linear_end: float = 2e-2, cosine_s: float = 8e-3, given_betas: Sequence[float] | None = None,
                 parameterization: str = "eps", scale_factor: float = 1.0, image_size: int = 64, channels: int = 4,
                 use_ema: bool = False, clip_denoised: bool = False, v_posterior: float = 0.0):
        super().__init__()
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"parameterization {parameterization!r} is not one of {PARAMETERIZATIONS}")
        self.parameterization = parameterization
        self.image_size = image_size
        self.channels = channels
        self.scale_factor = scale_factor
        self.clip_denoised = clip_denoised
        self.v_posterior = v_posterior
        # EMA weights are copied into `model` when the checkpoint is loaded (ldm.loading), so no shadow copy is kept
        self.use_ema = use_ema
        self.model = DiffusionWrapper(unet_config, conditioning_key)
        self.first_stage_model = instantiate_from_config(first_stage_config).eval()
        self.cond_stage_model = instantiate_from_config(cond_stage_config)
        if self.cond_stage_model is not None:
            self.cond_stage_model = self.cond_stage_model.eval()
        self.register_schedule(given_betas, beta_schedule, timesteps, linear_start, linear_end, cosine_s)

    # --- schedule -------------------------------------------------------------------------------------------------
    def register_schedule(self, given_betas: Sequence[float] | None = None, beta_schedule: str = "linear",
                          timesteps: int = 1000, linear_start: float = 1e-4, linear_end: float = 2e-2,
                          cosine_s: float = 8e-3) -> None:
        """The float32 schedule buffers of CompVis, computed in float64 first exactly as the original does."""
        betas = (np.asarray(given_betas, dtype=np.float64) if given_betas is not None else
                 make_beta_schedule(beta_schedule, timesteps, linear_start, linear_end, cosine_s))
        buffers = diffusion_schedule(betas)
        alphas_cumprod, alphas_cumprod_prev = buffers["alphas_cumprod"], buffers["alphas_cumprod_prev"]
        self.num_timesteps = int(betas.shape[0])
        self.linear_start, self.linear_end = linear_start, linear_end
        posterior_variance = ((1 - self.v_posterior) * betas * (1.0 - alphas_cumprod_prev) / (1.0 - alphas_cumprod)
                              + self.v_posterior * betas)
        buffers.update({
            "posterior_variance": posterior_variance,
            # clipped because the posterior variance is 0 at the start of the chain
            "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
            "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
            "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(1.0 - betas) / (1.0 - alphas_cumprod),
        })
        for name, value in buffers.items():
            self.register_buffer(name, torch.tensor(value, dtype=torch.float32, device="cpu"))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @contextmanager
    def ema_scope(self, context: str | None = None) -> Iterator[None]:
        """CompVis compatibility: EMA weights, when asked for, were already loaded into the model."""
        yield

    # --- conditioning and denoiser ----------------------------------------------------------------------------------
    def get_learned_conditioning(self, c: Any) -> Any:
        """Text (list of prompts) to the UNet's cross-attention context, through `cond_stage_model`."""
        if callable(getattr(self.cond_stage_model, "encode", None)):
            c = self.cond_stage_model.encode(c)
            return c.mode() if isinstance(c, DiagonalGaussianDistribution) else c
        return self.cond_stage_model(c)

    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Any, return_ids: bool = False) -> torch.Tensor:
        """The UNet's prediction (eps or v, per `parameterization`) for latents `x_noisy` at timesteps `t`."""
        if not isinstance(cond, dict):
            cond = cond if isinstance(cond, list) else [cond]
            cond = {("c_concat" if self.model.conditioning_key == "concat" else "c_crossattn"): cond}
        out = self.model(x_noisy, t, **cond)
        return out[0] if isinstance(out, tuple) and not return_ids else out

    # --- first stage ----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def decode_first_stage(self, z: torch.Tensor, predict_cids: bool = False,
                           force_not_quantize: bool = False) -> torch.Tensor:
        """Latents to images in [-1, 1] (undoing `scale_factor`)."""
        return self.first_stage_model.decode(z / self.scale_factor)

    @torch.no_grad()
    def encode_first_stage(self, x: torch.Tensor) -> DiagonalGaussianDistribution | torch.Tensor:
        """Images in [-1, 1] to the autoencoder's posterior; `get_first_stage_encoding` turns it into latents."""
        return self.first_stage_model.encode(x)

    def get_first_stage_encoding(self, encoder_posterior: DiagonalGaussianDistribution | torch.Tensor,
                                 generator: torch.Generator | None = None) -> torch.Tensor:
        """A posterior sample (noise from `generator` when given) times `scale_factor`."""
        if isinstance(encoder_posterior, DiagonalGaussianDistribution):
            z = encoder_posterior.sample(generator=generator)
        elif torch.is_tensor(encoder_posterior):
            z = encoder_posterior
        else:
            raise TypeError(f"encoder_posterior of type {type(encoder_posterior).__name__} is not supported")
        return self.scale_factor * z

    # --- schedule algebra used by samplers --------------------------------------------------------------------------
    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) noise."""
        return (extract_into_tensor(self.sqrt_alphas_cumprod, t, x_start) * x_start
                + extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise)

    def predict_start_from_noise(self, x_t: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return (extract_into_tensor(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
                - extract_into_tensor(self.sqrt_recipm1_alphas_cumprod, t, x_t) * noise)

    def predict_start_from_z_and_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return (extract_into_tensor(self.sqrt_alphas_cumprod, t, x_t) * x_t
                - extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_t) * v)

    def predict_eps_from_z_and_v(self, x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return (extract_into_tensor(self.sqrt_alphas_cumprod, t, x_t) * v
                + extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x_t) * x_t)

    def get_v(self, x: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return (extract_into_tensor(self.sqrt_alphas_cumprod, t, x) * noise
                - extract_into_tensor(self.sqrt_one_minus_alphas_cumprod, t, x) * x)


class LatentInpaintDiffusion(LatentDiffusion):
    """The inpainting models (RunwayML's sd-v1-5-inpainting, Stability's 512-inpainting-ema): a `hybrid` UNet fed the
    latents with the downsampled mask and the masked image's latents concatenated, in the order of `concat_keys`."""

    def __init__(self, *args: Any, concat_keys: Sequence[str] = ("mask", "masked_image"),
                 masked_image_key: str = "masked_image", **kwargs: Any):
        super().__init__(*args, **kwargs)
        if masked_image_key not in concat_keys:
            raise ValueError(f"masked_image_key {masked_image_key!r} is not one of concat_keys {list(concat_keys)}")
        self.concat_keys = tuple(concat_keys)
        self.masked_image_key = masked_image_key

    def inpainting_conditioning(self, c: Any, mask: torch.Tensor, masked_image_latents: torch.Tensor) -> dict:
        """The hybrid conditioning of text conditioning `c` for a mask [B, 1, h, w] (1 = repaint) and the masked
        image's latents [B, C, h, w]: `{"c_concat": [mask and latents in concat_keys order], "c_crossattn": [c]}`."""
        parts = [masked_image_latents if key == self.masked_image_key else mask for key in self.concat_keys]
        return {"c_concat": [torch.cat(parts, dim=1)], "c_crossattn": [c]}


class LatentUpscaleDiffusion(LatentDiffusion):
    """Stability's x4 upscaler (x4-upscaler-ema): a `hybrid-adm` UNet fed the latents with the noise-augmented
    low-resolution image concatenated (same height and width: the f=4 autoencoder makes the output 4x larger), the
    text as cross-attention context and the augmentation's noise level as its class label."""

    def __init__(self, *args: Any, low_scale_config: Mapping[str, Any], low_scale_key: str = "LR", **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.model.conditioning_key != "hybrid-adm":
            raise ValueError(f"LatentUpscaleDiffusion needs conditioning_key 'hybrid-adm' (latents and image "
                             f"concatenated, noise level as class label), got {self.model.conditioning_key!r}")
        self.low_scale_model = instantiate_from_config(low_scale_config).eval()
        self.low_scale_key = low_scale_key  # the training batch's key of the low-resolution image, as in Stability

    def upscale_conditioning(self, c: Any, augmented_image: torch.Tensor, noise_level: torch.Tensor) -> dict:
        """The hybrid-adm conditioning of text conditioning `c` for the noise-augmented low-resolution images
        [B, 3, h, w] (from `low_scale_model`) at integer `noise_level` [B]."""
        return {"c_concat": [augmented_image], "c_crossattn": [c], "c_adm": noise_level}
