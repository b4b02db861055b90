"""What a model config says about the images it makes, read before any weights load: its kind (text-to-image,
inpainting, x4 upscaler), latent geometry, default size, and the sizes and step counts it can take."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from ldm.checkpoints import CheckpointError
from ldm.diffusers_folder import FolderError, is_diffusers_folder, read_folder
from ldm.loading import LoadError, checkpoint_shapes
from ldm.weight_parts import UNET_PART, PartError, part_weights
from ldm.models.diffusion.ddim import make_ddim_timesteps
from ldm.pipeline.errors import UsageError
from ldm.pipeline.request import Request, nearest_multiples

SD_DEFAULTS = {"f": 8, "C": 4, "H": 512, "W": 512}  # the CompVis flag defaults, which every SD config agrees with
SDXL_SIZE = 1024  # SDXL (generative-models) configs give no image_size; base and refiner were trained at 1024
GUIDANCE_EMBEDDING_KEY = "model.diffusion_model.time_cond_proj.weight"
SDXL_TURBO_SIZE = 512  # SDXL Turbo shares the base config but was trained at 512; its files say "turbo" in the name


def model_defaults(config: Any | None, ckpt: str | None = None) -> dict[str, int]:
    """{"f", "C", "H", "W"} of the model: autoencoder factor, latent channels and its own image size (image_size x f;
    SDXL 1024, SDXL Turbo 512); the CompVis defaults for a config of another shape or none."""
    values = dict(SD_DEFAULTS)
    if config is None:
        return values
    try:
        f, channels, _ = model_geometry(config)
        default = SD_DEFAULTS["H"] // f
        if "network_config" in config.model.params:
            turbo = "turbo" in Path(ckpt or "").name.lower()
            default = (SDXL_TURBO_SIZE if turbo else SDXL_SIZE) // f
            if ckpt is not None and is_diffusers_folder(ckpt):  # its UNet config says
                default = read_folder(ckpt).sample_size
        size = int(config.model.params.get("image_size", default)) * f
        return {"f": f, "C": channels, "H": size, "W": size}
    except (AttributeError, KeyError, TypeError, ValueError, FolderError):  # another kind of config: CompVis defaults
        return values


def takes_guidance_embedding(ckpt: str, unet: str | None = None) -> bool:
    """Whether the model's UNet (the `unet` file's when given) takes the guidance scale as an input (a latent
    consistency model such as LCM_Dreamshaper_v7 or lcm-sdxl), read from the files' layout; False when unreadable
    (the loader reports that in its turn)."""
    try:
        keys = part_weights(unet, UNET_PART, shapes_only=True) if unet else checkpoint_shapes(ckpt)
    except (LoadError, PartError, CheckpointError, OSError):
        return False
    return GUIDANCE_EMBEDDING_KEY in keys


def model_geometry(config: Any) -> tuple[int, int, int]:
    """(autoencoder factor f, latent channels, UNet downsampling factor) from a model config (OmegaConf)."""
    params = config.model.params
    ddconfig = params.first_stage_config.params.ddconfig
    f = 2 ** (len(ddconfig.ch_mult) - 1)
    unet = params.unet_config if "unet_config" in params else params.network_config  # SDXL's name for it
    # the latents are what the UNet predicts: inpainting UNets take more channels in (mask, masked image)
    channels = int(unet.params.get("out_channels", unet.params.get("in_channels", params.get("channels", 4))))
    unet_factor = 2 ** (len(unet.params.channel_mult) - 1)
    return f, channels, unet_factor


def builds_model_class(config: Any, name: str) -> bool:
    """Whether the config's model.target is a class called `name`."""
    try:
        return str(config.model.target).rpartition(".")[2] == name
    except AttributeError:
        return False


def is_inpainting_config(config: Any) -> bool:
    """Whether the config builds an inpainting model (`LatentInpaintDiffusion`: the UNet also takes the mask and the
    masked image's latents)."""
    return builds_model_class(config, "LatentInpaintDiffusion")


def is_upscaler_config(config: Any) -> bool:
    """Whether the config builds Stability's x4 upscaler (`LatentUpscaleDiffusion`: the UNet also takes the
    low-resolution image and its noise level)."""
    return builds_model_class(config, "LatentUpscaleDiffusion")


def refuse_upscaler(config: Any, ckpt: str) -> None:
    """UsageError naming scripts/upscale.py when `config` is the x4 upscaler's (other scripts cannot run it)."""
    if is_upscaler_config(config):
        raise UsageError(f"{ckpt} is the x4 upscaler (its UNet also takes a low-resolution image and a noise "
                         f"level): use scripts/upscale.py --init-img IMAGE")


def refuse_inpainting(config: Any, ckpt: str) -> None:
    """UsageError naming scripts/inpaint.py when `config` is an inpainting model's (it needs a mask)."""
    if is_inpainting_config(config):
        raise UsageError(f"{ckpt} is an inpainting model (its UNet also takes a mask and the masked "
                         f"image): use scripts/inpaint.py --init-img IMAGE --mask MASK")


def refuse_special_models(config: Any, ckpt: str) -> None:
    """UsageError unless `config` is a plain text-to-image model's (not the x4 upscaler, not an inpainting model)."""
    refuse_upscaler(config, ckpt)
    refuse_inpainting(config, ckpt)


def ddim_steps_fit(steps: int, timesteps: int) -> bool:
    """Whether DDIM/PLMS's uniform timesteps for `steps` stay inside the model's (CompVis's +1 shift can overshoot)."""
    return max(make_ddim_timesteps("uniform", steps, timesteps)) < timesteps


def check_steps(requests: Iterable[Request], timesteps: int) -> None:
    for request in requests:
        steps, sampler = request.steps, request.sampler
        if sampler in ("ddim", "plms") and not ddim_steps_fit(steps, timesteps):
            fits = [n for n in range(max(1, steps - 20), min(timesteps, steps + 20) + 1) if ddim_steps_fit(n, timesteps)]
            nearest = min(fits, key=lambda n: (abs(n - steps), n)) if fits else 50
            raise UsageError(f"{sampler} cannot take {steps} steps on this {timesteps}-step model (its uniform "
                             f"timesteps, shifted by one as in CompVis, would end past the last): try {nearest}")


def check_latent_flags(f: int, channels: int, config: Any) -> None:
    """CompVis' --f and --C must be the model's own."""
    try:
        model_f, model_channels, _ = model_geometry(config)
    except (AttributeError, KeyError, TypeError):  # a config of another shape: leave the checks to the model
        return
    if f != model_f:
        raise UsageError(f"--f {f} does not match this model, whose autoencoder downsamples by {model_f}: pass "
                         f"--f {model_f}")
    if channels != model_channels:
        raise UsageError(f"--C {channels} does not match this model's {model_channels} latent channels: pass "
                         f"--C {model_channels}")


def check_against_model(requests: Iterable[Request], config: Any) -> None:
    """Every size must pass through the UNet's downsampling and back; DDIM/PLMS step counts must fit the model's
    timesteps."""
    requests = list(requests)
    check_steps(requests, int(config.model.params.get("timesteps", 1000)))
    try:
        f, _, unet_factor = model_geometry(config)
    except (AttributeError, KeyError, TypeError):
        return
    multiple = f * unet_factor
    for request in requests:
        for name, value in (("H", request.height), ("W", request.width)):
            if value is not None and value % multiple:
                raise UsageError(f"{name} {value} does not fit this model: sizes must be multiples of {multiple} "
                                 f"(autoencoder {f}x, UNet {unet_factor}x): try {nearest_multiples(value, multiple)}")
