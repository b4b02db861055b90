"""Inpainting: repaint where a mask is 1 (white), keep the rest of the init image.

Two ways, chosen by the model:
- inpainting models (`LatentInpaintDiffusion`: sd-v1-5-inpainting, 512-inpainting-ema) see the mask and the masked
  image's latents beside the latents at every step (the `hybrid` conditioning), as Stability's inpainting script
  and diffusers' StableDiffusionInpaintPipeline feed them;
- any text-to-image model repaints by latent blending, diffusers' rule for 4-channel UNets: after every step the
  kept region is reset to the init latents noised to the next step's level with the starting noise, and to the
  clean init latents after the last step (`KnownLatents`).

Per image, the random draws come in diffusers' order from the image's own stream: the init image's posterior
sample (when used: text-to-image models, or strength below 1), the starting noise, then the masked image's
posterior sample (inpainting models). With strength 1 sampling starts from pure noise; below 1 the init latents
are noised as img2img noises them (`sample_img2img`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ldm.models.diffusion.noise import ImageNoise
from ldm.models.diffusion.samplers import encoded_latents, resolves_img2img, sample, sample_img2img

MASK_THRESHOLD = 0.5  # Stability's make_batch_sd and diffusers' mask processor binarise here


def binarize_mask(mask: torch.Tensor) -> torch.Tensor:
    """A mask in [0, 1] as 0/1 float: 1 (repaint) where it is at least 0.5."""
    return (mask >= MASK_THRESHOLD).to(torch.float32)


def masked_image(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The image [B, 3, H, W] in [-1, 1] with the region to repaint (mask [B, 1, H, W] = 1) set to 0 (grey)."""
    return image * (mask < MASK_THRESHOLD)


def latent_mask(mask: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """A pixel mask [B, 1, H, W] at the latents' size (nearest neighbour, as both references downsample it)."""
    return F.interpolate(mask, size=(height, width))


def is_inpainting_model(model: Any) -> bool:
    """Whether `model` takes the mask and the masked image itself (a `LatentInpaintDiffusion`)."""
    return callable(getattr(model, "inpainting_conditioning", None))


@dataclass
class InpaintingInputs:
    """One init image and mask, prepared once for every batch at one size."""

    image_posterior: Any  # the autoencoder's posterior of the init image
    mask: torch.Tensor  # [1, 1, h, w] at the latents' size, 1 = repaint
    masked_image_posterior: Any = None  # of the masked image; inpainting models only


class KnownLatents:
    """The init latents to keep where the latent mask is 0, and the unit noise that sampling started from.

    diffusers pastes the noised init latents into the kept region after each step. Pasting them into the latents
    right before each model evaluation instead gives the model the same input, and every sampler update is
    elementwise, so the region to repaint comes out the same while the sampler's own copy of the kept region is
    never read; `paste` puts the clean init latents into the result. With `skip_first` (sampling from pure noise,
    strength 1) the first evaluation sees the starting noise unchanged, as diffusers' first step does.
    """

    def __init__(self, x0: torch.Tensor, mask: torch.Tensor, noise: torch.Tensor, skip_first: bool):
        if x0.shape != noise.shape or mask.shape[0] != x0.shape[0] or mask.shape[2:] != x0.shape[2:]:
            raise ValueError(f"known latents {tuple(x0.shape)}, mask {tuple(mask.shape)} and noise "
                             f"{tuple(noise.shape)} must agree in batch and size (mask: one channel)")
        self.x0, self.mask, self.noise = x0, mask.to(x0), noise.to(x0)
        self.skip_first = skip_first

    def paste_noised(self, x: torch.Tensor, noised: torch.Tensor) -> torch.Tensor:
        """`x` [B or 2B, C, h, w] with `noised` [B, C, h, w] in the kept region."""
        repeats = x.shape[0] // self.x0.shape[0]  # classifier-free guidance doubles the batch
        mask = self.mask.repeat(repeats, 1, 1, 1).to(x.dtype)
        return (1 - mask) * noised.repeat(repeats, 1, 1, 1).to(x.dtype) + mask * x

    def paste(self, x: torch.Tensor) -> torch.Tensor:
        """`x` with the clean init latents in the kept region."""
        return self.paste_noised(x, self.x0)

    def around_denoiser(self, denoiser: Any) -> "_PastingDenoiser":
        """A k-diffusion denoiser whose input carries x0 + sigma * noise in the kept region."""
        return _PastingDenoiser(denoiser, self)

    def around_model(self, model: Any) -> "_PastingModel":
        """`model` whose `apply_model` input carries sqrt(a_t) x0 + sqrt(1 - a_t) noise in the kept region."""
        return _PastingModel(model, self)


class _FirstCallSkipper:
    def __init__(self, known: KnownLatents):
        self.known = known
        self.calls = 0

    def should_paste(self) -> bool:
        self.calls += 1
        return not (self.known.skip_first and self.calls == 1)


class _PastingDenoiser(_FirstCallSkipper):
    def __init__(self, denoiser: Any, known: KnownLatents):
        super().__init__(known)
        self.denoiser = denoiser

    def __getattr__(self, name: str) -> Any:  # schedule attributes some samplers read
        if name == "denoiser":  # not set yet (copies): no recursion
            raise AttributeError(name)
        return getattr(self.denoiser, name)

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, **extra: Any) -> torch.Tensor:
        if self.should_paste():
            sigma_ = sigma.reshape(-1, *([1] * (x.ndim - 1)))[: self.known.x0.shape[0]].to(x.dtype)
            x = self.known.paste_noised(x, self.known.x0 + sigma_ * self.known.noise)
        return self.denoiser(x, sigma, **extra)


class _PastingModel(_FirstCallSkipper):
    def __init__(self, model: Any, known: KnownLatents):
        super().__init__(known)
        self.model = model

    def __getattr__(self, name: str) -> Any:  # the schedule and conversions CompVis samplers read
        if name == "model":  # not set yet (copies): no recursion
            raise AttributeError(name)
        return getattr(self.model, name)

    def apply_model(self, x: torch.Tensor, t: torch.Tensor, cond: Any, **kwargs: Any) -> torch.Tensor:
        if self.should_paste():
            batch = self.known.x0.shape[0]
            x = self.known.paste_noised(x, self.model.q_sample(self.known.x0, t[:batch], self.known.noise))
        return self.model.apply_model(x, t, cond, **kwargs)


def sample_inpaint(model: Any, name: str, steps: int, inputs: InpaintingInputs, strength: float, cond: Any,
                   uncond: Any, scale: float, noise: ImageNoise, eta: float | None = None,
                   disable: bool | None = None, steps_rule: str = "diffusers") -> torch.Tensor:
    """Latents [B, C, h, w] (B = len(noise)) of the init image repainted where `inputs.mask` is 1, by sampler `name`
    over `steps` steps (the last int(strength * steps) of them below strength 1, or as `steps_rule` counts them:
    see `sample_img2img`), with classifier-free guidance `scale` between text conditionings `cond` and `uncond`
    (uncond None: no guidance)."""
    inpainting = is_inpainting_model(model)
    if not (inpainting and strength == 1.0) and not resolves_img2img(name):
        raise ValueError(f"sampler {name!r} cannot inpaint here (it cannot start from an image or paste latents "
                         f"in): use ddim or a k-diffusion sampler (euler, euler_a, dpmpp_2m, ...)")
    if inpainting and inputs.masked_image_posterior is None:
        raise ValueError("an inpainting model needs the masked image's posterior (InpaintingInputs."
                         "masked_image_posterior)")
    batch = len(noise)
    x_init = encoded_latents(model, inputs.image_posterior, noise) if not inpainting or strength < 1 else None
    mask = inputs.mask.to(device=model.device, dtype=torch.float32).expand(batch, -1, -1, -1)
    channels = x_init.shape[1] if x_init is not None else model.channels
    shape = (batch, channels, *mask.shape[2:])
    start_noise = noise.randn(shape, device=model.device)
    known = None
    if inpainting:
        masked_latents = encoded_latents(model, inputs.masked_image_posterior, noise)
        cond = model.inpainting_conditioning(cond, mask, masked_latents)
        uncond = None if uncond is None else model.inpainting_conditioning(uncond, mask, masked_latents)
    else:
        known = KnownLatents(x_init, mask, start_noise, skip_first=strength == 1.0)
    if strength == 1.0:
        return sample(model, name, steps, shape, cond, uncond, scale, noise, x_T=start_noise, eta=eta,
                      disable=disable, known=known)
    return sample_img2img(model, name, steps, x_init, strength, cond, uncond, scale, noise, eta=eta, disable=disable,
                          start_noise=start_noise, known=known, steps_rule=steps_rule)
