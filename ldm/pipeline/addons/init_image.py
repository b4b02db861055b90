"""Starting from an image: img2img (`InitImage`, SDEdit: noise it part of the way, denoise back) and inpainting
(`Inpaint`: repaint the white part of a mask).

The init image is resized (LANCZOS) to each request's size and encoded once per size; each image of a batch samples
that posterior with its own seed. Inpainting models (sd-v1-5-inpainting, 512-inpainting-ema) see the mask and the
masked image's latents beside the latents; every other SD 1.x/2.x/XL model repaints by latent blending (see
`ldm.models.diffusion.inpainting`).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np
import torch

from ldm.models.diffusion.inpainting import (InpaintingInputs, is_inpainting_model, latent_mask, masked_image,
                                             sample_inpaint)
from ldm.models.diffusion.samplers import (IMG2IMG_RULES, encoded_latents, img2img_rule, img2img_steps,
                                          resolves_img2img, sample_img2img)
from ldm.pipeline.addons.base import AddOn, SampleCall
from ldm.pipeline.decoding import first_stage_dtype
from ldm.pipeline.errors import UsageError
from ldm.pipeline.images import image_to_tensor, mask_to_tensor
from ldm.pipeline.metadata import ExtraField
from ldm.pipeline.model_info import is_inpainting_config, refuse_special_models, refuse_upscaler

if TYPE_CHECKING:
    from ldm.pipeline.pipeline import Pipeline, Setup
    from ldm.pipeline.request import Request


def encode_image(model: Any, image: torch.Tensor) -> Any:
    """The autoencoder's posterior of one image [1, 3, H, W] in [-1, 1]."""
    return model.encode_first_stage(image.to(device=model.device, dtype=first_stage_dtype(model)))


def check_samplers_start_from_image(requests: Sequence[Request], what: str, why: str = "") -> None:
    """UsageError for a request whose sampler cannot start from an image (plms, dpm_solver)."""
    for request in requests:
        if not resolves_img2img(request.sampler):
            raise UsageError(f"{what} cannot use the {request.sampler} sampler{why}: use ddim (the default) or a "
                             f"k-diffusion sampler such as euler_a or dpmpp_2m")


class InitImage(AddOn):
    """img2img from the RGB PIL `image` (read from `path`, hashed as `image_hash` for the metadata) at `strength`:
    0 keeps the image, 1 replaces it; int(strength * steps) of a request's steps run, or with `steps_rule` "a1111"
    as many as AUTOMATIC1111 runs with a k-diffusion sampler (one more; `img2img_steps`)."""

    samples = True

    def __init__(self, image: Any, strength: float = 0.75, path: str = "", image_hash: str = "",
                 steps_rule: str = "diffusers"):
        if not 0.0 <= strength <= 1.0:  # also refuses NaN
            raise UsageError(f"--strength {strength} is outside [0, 1]: 0 keeps the init image, 1 replaces it")
        if steps_rule not in IMG2IMG_RULES:
            raise UsageError(f"--img2img_steps {steps_rule} is not one of {', '.join(IMG2IMG_RULES)}")
        self.image, self.strength, self.path, self.image_hash = image, float(strength), path, image_hash
        self.steps_rule = steps_rule
        self.posteriors: dict[tuple[int, int], Any] = {}  # (W, H) -> the encoded init image at that size

    def check_model_kind(self, config: Any, ckpt: str) -> None:
        refuse_special_models(config, ckpt)

    def check(self, setup: Setup, requests: Sequence[Request]) -> None:
        check_samplers_start_from_image(requests, "img2img", " (CompVis' img2img refuses plms too)")

    def warm_up_steps(self) -> int:
        """Enough DDIM steps that int(strength * steps) is one: the warm-up runs the UNet once, as txt2img's does."""
        if self.strength == 0:
            return 1
        steps = math.ceil(1 / self.strength)
        return steps if int(self.strength * steps) >= 1 else steps + 1  # float rounding of strength * steps

    def posterior(self, model: Any, width: int, height: int) -> Any:
        if (width, height) not in self.posteriors:
            self.posteriors[width, height] = encode_image(model, image_to_tensor(self.image, width, height))
        return self.posteriors[width, height]

    def sample(self, pipeline: Pipeline, call: SampleCall) -> tuple[torch.Tensor, int]:
        request = call.request
        height, width = request.size
        noise = pipeline.noise(request)
        x_init = encoded_latents(pipeline.model, self.posterior(pipeline.model, width, height), noise)
        latents = sample_img2img(pipeline.model, call.sampler, call.steps, x_init, self.strength, call.cond,
                                 call.uncond, request.scale, noise, eta=call.eta, steps_rule=self.steps_rule)
        return latents, self.steps_run(call)

    def steps_run(self, call: SampleCall) -> int:
        return self.steps_for(call.sampler, call.steps)

    def steps_for(self, sampler: str, steps: int) -> int:
        """How many of `steps` sampler `sampler` runs from the image (t_enc)."""
        return img2img_steps(steps, self.strength, img2img_rule(sampler, self.steps_rule))

    def record(self, request: Request, index: int) -> dict[str, Any]:
        extras = [ExtraField("strength", self.strength, "Denoising strength", repr(self.strength)),
                  ExtraField("init_image", self.path, "Init image", Path(self.path).name),
                  ExtraField("init_image_hash", self.image_hash, "Init image hash", self.image_hash)]
        if img2img_rule(request.sampler, self.steps_rule) == "a1111":
            extras.append(ExtraField("img2img_steps", "a1111", "Img2img steps", "A1111"))
        return {"extras": extras}


class Inpaint(InitImage):
    """Inpainting: `image` repainted where the PIL `mask` (read from `mask_path`) is white (>= 50% grey)."""

    def __init__(self, image: Any, mask: Any, strength: float = 1.0, path: str = "", image_hash: str = "",
                 mask_path: str = "", mask_hash: str = "", steps_rule: str = "diffusers"):
        super().__init__(image, strength, path, image_hash, steps_rule)
        self.mask, self.mask_path, self.mask_hash = mask, mask_path, mask_hash
        self.inputs: dict[tuple[int, int], InpaintingInputs] = {}

    @property
    def has_white(self) -> bool:
        return bool(np.asarray(self.mask.convert("L")).max() >= 128)  # binarised at 0.5: 128/255 is the first white

    def check_model_kind(self, config: Any, ckpt: str) -> None:
        """Inpainting and text-to-image models both inpaint (the latter by blending); the upscaler does not."""
        refuse_upscaler(config, ckpt)

    def check(self, setup: Setup, requests: Sequence[Request]) -> None:
        if is_inpainting_config(setup.config) and self.strength == 1.0:
            return  # the inpainting UNet sees the mask at every step: any sampler works
        for request in requests:
            if not resolves_img2img(request.sampler):
                raise UsageError(f"inpainting cannot use the {request.sampler} sampler with a text-to-image "
                                 f"checkpoint or --strength below 1: use ddim (the default) or a k-diffusion sampler "
                                 f"such as euler_a or dpmpp_2m")

    def inputs_at(self, pipeline: Pipeline, width: int, height: int) -> InpaintingInputs:
        """The init image and mask prepared for images of width x height (encoded once per size)."""
        if (width, height) not in self.inputs:
            model, f = pipeline.model, pipeline.defaults["f"]
            image = image_to_tensor(self.image, width, height)
            mask = mask_to_tensor(self.mask, width, height)
            inpainting = is_inpainting_model(model)
            self.inputs[width, height] = InpaintingInputs(
                image_posterior=encode_image(model, image) if not inpainting or self.strength < 1 else None,
                mask=latent_mask(mask, height // f, width // f),
                masked_image_posterior=encode_image(model, masked_image(image, mask)) if inpainting else None)
        return self.inputs[width, height]

    def sample(self, pipeline: Pipeline, call: SampleCall) -> tuple[torch.Tensor, int]:
        request = call.request
        height, width = request.size
        latents = sample_inpaint(pipeline.model, call.sampler, call.steps, self.inputs_at(pipeline, width, height),
                                 self.strength, call.cond, call.uncond, request.scale, pipeline.noise(request),
                                 eta=call.eta, steps_rule=self.steps_rule)
        return latents, self.steps_run(call)

    def record(self, request: Request, index: int) -> dict[str, Any]:
        extras = super().record(request, index)["extras"] + [
            ExtraField("mask", self.mask_path, "Mask", Path(self.mask_path).name),
            ExtraField("mask_hash", self.mask_hash, "Mask hash", self.mask_hash)]
        return {"extras": extras}
