"""Sampler names users know ("Euler a", "DPM++ 2M Karras", "ddim", ...) and one entry point that runs any of them.

Names match case- and separator-insensitively ("DPM++ 2M Karras" == "dpmpp_2m_karras" == "dpmpp-2m-karras"); every
k-diffusion sampler also has a Karras-schedule variant, named with a " Karras" / "_karras" suffix.
"""
from __future__ import annotations

import importlib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from ldm.models.diffusion import k_sampling
from ldm.models.diffusion.k_denoisers import CompVisDenoiser, make_denoiser
from ldm.models.diffusion.k_schedules import get_sigmas_karras
from ldm.models.diffusion.noise import ImageNoise
from ldm.models.diffusion.uni_pc import sample_unipc

if TYPE_CHECKING:
    from ldm.models.diffusion.inpainting import KnownLatents

KARRAS_SUFFIX = "karras"


@dataclass(frozen=True)
class SamplerSpec:
    """One sampler: a k-diffusion style `function` on a sigma `schedule`, or a CompVis sampler class (`compvis`,
    "module:Class", imported only when used)."""

    name: str
    function: Callable[..., torch.Tensor] | None = None
    schedule: str = "model"  # "model" (k-diffusion's get_sigmas), "discrete" (diffusers' linspace) or "karras"
    stochastic: bool = False  # takes eta and draws noise
    compvis: str | None = None

    def sigmas(self, denoiser: CompVisDenoiser, steps: int) -> torch.Tensor:
        if self.schedule == "karras":
            return get_sigmas_karras(steps, denoiser.sigma_min, denoiser.sigma_max, device=denoiser.sigmas.device,
                                     dtype=denoiser.sigmas.dtype)
        if self.schedule == "discrete":
            return denoiser.get_sigmas_discrete(steps)
        return denoiser.get_sigmas(steps)


_K_SAMPLERS = [
    # canonical name, function, own schedule, stochastic, aliases
    ("euler", k_sampling.sample_euler, "model", False, ()),
    ("euler_a", k_sampling.sample_euler_ancestral, "model", True, ("euler_ancestral",)),
    ("heun", k_sampling.sample_heun, "model", False, ()),
    ("dpm2", k_sampling.sample_dpm_2, "model", False, ()),
    ("dpm2_a", k_sampling.sample_dpm_2_ancestral, "model", True, ("dpm2_ancestral",)),
    ("lms", k_sampling.sample_lms, "model", False, ()),
    ("dpmpp_2s_a", k_sampling.sample_dpmpp_2s_ancestral, "model", True, ("dpmpp_2s_ancestral",)),
    ("dpmpp_2m", k_sampling.sample_dpmpp_2m, "model", False, ()),
    ("dpmpp_sde", k_sampling.sample_dpmpp_sde, "model", True, ()),
    ("dpmpp_2m_sde", k_sampling.sample_dpmpp_2m_sde, "model", True, ()),
    ("unipc", sample_unipc, "discrete", False, ("uni_pc",)),
]
_COMPVIS_SAMPLERS = [
    ("ddim", "ldm.models.diffusion.ddim:DDIMSampler", ()),
    ("plms", "ldm.models.diffusion.plms:PLMSSampler", ()),
    ("dpm_solver", "ldm.models.diffusion.dpm_solver:DPMSolverSampler", ()),
]


def normalize_name(name: str) -> str:
    """"DPM++ 2M Karras" -> "dpmpp2mkarras": lower case, "+" as "p", separators dropped."""
    return re.sub(r"[^a-z0-9]", "", name.lower().replace("+", "p"))


def _build_registry() -> tuple[dict[str, SamplerSpec], list[str]]:
    by_key: dict[str, SamplerSpec] = {}
    names: list[str] = []

    def add(spec: SamplerSpec, aliases: Sequence[str]) -> None:
        names.append(spec.name)
        for alias in (spec.name, *aliases):
            by_key[normalize_name(alias)] = spec

    for name, function, schedule, stochastic, aliases in _K_SAMPLERS:
        add(SamplerSpec(name, function, schedule, stochastic), aliases)
    for name, function, _, stochastic, aliases in _K_SAMPLERS:
        karras_aliases = [f"{alias}_{KARRAS_SUFFIX}" for alias in aliases]
        add(SamplerSpec(f"{name}_{KARRAS_SUFFIX}", function, "karras", stochastic), karras_aliases)
    for name, target, aliases in _COMPVIS_SAMPLERS:
        add(SamplerSpec(name, compvis=target, stochastic=name == "ddim"), aliases)
    return by_key, names


_REGISTRY, _NAMES = _build_registry()


def available_samplers() -> list[str]:
    """Canonical sampler names, for the CLI's --help."""
    return list(_NAMES)


def resolve_sampler(name: str) -> SamplerSpec:
    """The sampler called `name`; ValueError listing the valid names if there is none."""
    key = normalize_name(name)
    if key.startswith("k") and key not in _REGISTRY and key[1:] in _REGISTRY:
        key = key[1:]  # "k_euler_a", "k_lms": the names of the first k-diffusion front ends
    if key not in _REGISTRY:
        raise ValueError(f"unknown sampler {name!r}: choose one of {', '.join(_NAMES)} "
                         "(case and separators do not matter: 'DPM++ 2M Karras' is dpmpp_2m_karras)")
    return _REGISTRY[key]


def _load_compvis_sampler(target: str) -> type:
    module, _, cls = target.partition(":")
    return getattr(importlib.import_module(module), cls)


def sample(model: Any, name: str, steps: int, shape: Sequence[int], cond: Any, uncond: Any, scale: float,
           noise: ImageNoise, x_T: torch.Tensor | None = None, eta: float | None = None,
           callback: Callable[[dict[str, Any]], None] | None = None, disable: bool | None = None,
           known: KnownLatents | None = None) -> torch.Tensor:
    """Latents [B, C, H, W] = `shape` sampled by sampler `name` in `steps` steps, with classifier-free guidance
    `scale` between `cond` and `uncond`.

    `x_T` is unit-variance starting noise (drawn from `noise` when None); the k-diffusion samplers start from
    x_T * sigmas[0] and take all further noise from `noise`, so each image depends only on its own seed. `eta`
    None keeps each sampler's default (1 for ancestral and SDE samplers, 0 for DDIM). `callback` receives a dict
    with at least "i" (step index) and "denoised" (the current clean-latent estimate) once per step. `known`
    (inpainting with a text-to-image model, see inpainting.py) pastes known latents in around every model call and
    into the result.
    """
    spec = resolve_sampler(name)
    shape = tuple(int(size) for size in shape)
    check_sampling_request(spec, steps, shape, noise, eta)
    if x_T is None:
        x_T = noise.randn(shape, device=model.device, dtype=torch.float32)
    elif tuple(x_T.shape) != shape:
        raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected {shape}")

    if spec.compvis is not None:
        latents = _sample_compvis(spec, _around_model(model, known), steps, shape, cond, uncond, scale, noise, x_T,
                                  eta, callback, disable)
        return _paste_known(latents, known)

    denoiser = make_denoiser(model)
    sigmas = spec.sigmas(denoiser, steps).to(x_T.device)
    latents = run_k_sampler(spec, _around_denoiser(denoiser, known), x_T * sigmas[0], sigmas, cond, uncond, scale,
                             noise, eta, callback, disable)
    return _paste_known(latents, known)


def img2img_steps(steps: int, strength: float) -> int:
    """How many of `steps` an img2img run with `strength` takes: int(strength * steps), as CompVis counts t_enc."""
    if not 0.0 <= strength <= 1.0:  # also refuses NaN
        raise ValueError(f"strength must lie in [0, 1] (0 keeps the image, 1 replaces it), got {strength}")
    return int(strength * steps)


def sample_img2img(model: Any, name: str, steps: int, x_init: torch.Tensor, strength: float, cond: Any, uncond: Any,
                   scale: float, noise: ImageNoise, eta: float | None = None, disable: bool | None = None,
                   start_noise: torch.Tensor | None = None, known: KnownLatents | None = None) -> torch.Tensor:
    """Latents [B, C, H, W] made from clean latents `x_init` of that shape: noised part of the way, then denoised by
    sampler `name` over the last t_enc = int(`strength` * `steps`) steps of its `steps`-step schedule (SDEdit,
    Meng et al. 2021). The noise comes from `noise`, after whatever the caller drew from it for `x_init`.

    ddim does what CompVis' img2img does: `stochastic_encode` to DDIM step t_enc, one step above the first step it
    takes, then `decode` through t_enc steps; t_enc = 0 returns those noised latents. Where t_enc is past the last
    DDIM step (strength 1, on which CompVis fails with an index error) it starts from pure noise, as txt2img does.
    The k-diffusion samplers noise to their schedule's sigma at the first step they take and run the schedule's last
    t_enc + 1 sigmas, as A1111 and diffusers do; t_enc = 0 returns `x_init`. plms and dpm_solver cannot start from
    an image (CompVis refuses plms there too). `start_noise` is the unit noise to noise `x_init` with (drawn from
    `noise` when None); `known` is as for `sample`.
    """
    spec = resolve_sampler(name)
    check_sampling_request(spec, steps, tuple(x_init.shape), noise, eta)
    t_enc = img2img_steps(steps, strength)
    if spec.name == "ddim":
        latents = _ddim_img2img(spec, _around_model(model, known), steps, x_init, t_enc, cond, uncond, scale, noise,
                                eta, disable, start_noise)
        return _paste_known(latents, known)
    if spec.compvis is not None:
        raise ValueError(f"sampler {spec.name!r} cannot start from an image: use ddim or a k-diffusion sampler "
                         f"(euler, euler_a, dpmpp_2m, dpmpp_2m_karras, unipc, ...)")
    denoiser = make_denoiser(model)
    sigmas = spec.sigmas(denoiser, steps).to(x_init.device)[steps - t_enc:]
    x = x_init + (noise.randn_like(x_init) if start_noise is None else start_noise) * sigmas[0]
    if t_enc > 0:
        x = run_k_sampler(spec, _around_denoiser(denoiser, known), x, sigmas, cond, uncond, scale, noise, eta, None,
                           disable)
    return _paste_known(x, known)


def encoded_latents(model: Any, posterior: Any, noise: ImageNoise) -> torch.Tensor:
    """One sample of an encoded image's autoencoder `posterior` per seed of `noise` ([B, C, h, w] float32, times the
    model's scale factor).

    Each takes its noise from its own image's generator, as the next draw of that image's stream: diffusers'
    img2img and inpainting pipelines draw the same with one generator per image, and the image then depends on its
    seed alone.
    """
    return torch.cat([model.get_first_stage_encoding(posterior, generator=generator)
                      for generator in noise.generators]).float()


def resolves_img2img(name: str) -> bool:
    """Whether `sample_img2img` can run sampler `name` (ddim and the k-diffusion samplers can)."""
    spec = resolve_sampler(name)
    return spec.name == "ddim" or spec.compvis is None


def check_sampling_request(spec: SamplerSpec, steps: int, shape: tuple[int, ...], noise: ImageNoise,
                           eta: float | None) -> None:
    """ValueError unless `steps`, the latents' `shape` [B, C, H, W] (B = one seed of `noise` each) and `eta` suit
    sampler `spec`."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if len(shape) != 4 or shape[0] != len(noise):
        raise ValueError(f"shape {shape} must be [batch, channels, height, width] with batch = {len(noise)}, "
                         "the number of seeds in `noise`")
    if eta is not None and eta != 0 and not spec.stochastic:
        raise ValueError(f"sampler {spec.name!r} is deterministic and takes no eta (got eta={eta}); "
                         "use an ancestral or SDE sampler, or ddim, for eta > 0")


def run_k_sampler(spec: SamplerSpec, denoiser: CompVisDenoiser, x: torch.Tensor, sigmas: torch.Tensor, cond: Any,
                  uncond: Any, scale: float, noise: ImageNoise, eta: float | None,
                  callback: Callable[[dict[str, Any]], None] | None, disable: bool | None) -> torch.Tensor:
    """k-diffusion sampler `spec` from `x` (at noise level sigmas[0]) down `sigmas`, guided with `scale` between
    `cond` and `uncond`, its step noise from `noise`; `eta` None keeps the sampler's default."""
    knobs: dict[str, Any] = {"noise_sampler": noise.noise_sampler(x)}
    if eta is not None and spec.stochastic:
        knobs["eta"] = eta
    extra_args = {"cond": cond, "uncond": uncond, "cond_scale": scale}
    return spec.function(denoiser, x, sigmas, extra_args=extra_args, callback=callback, disable=disable, **knobs)


def _ddim_img2img(spec: SamplerSpec, model: Any, steps: int, x_init: torch.Tensor, t_enc: int, cond: Any,
                  uncond: Any, scale: float, noise: ImageNoise, eta: float | None, disable: bool | None,
                  start_noise: torch.Tensor | None = None) -> torch.Tensor:
    sampler = _load_compvis_sampler(spec.compvis)(model)
    sampler.make_schedule(ddim_num_steps=steps, ddim_eta=0.0 if eta is None else eta, verbose=False)
    if t_enc < len(sampler.ddim_timesteps):
        t = torch.full((x_init.shape[0],), t_enc, dtype=torch.long)
        x = sampler.stochastic_encode(x_init, t, noise=noise if start_noise is None else start_noise)
    else:
        x = noise.randn_like(x_init) if start_noise is None else start_noise
    if t_enc == 0:
        return x
    return sampler.decode(x, cond, t_enc, unconditional_guidance_scale=scale, unconditional_conditioning=uncond,
                          noise=noise, verbose=not disable)


def _around_model(model: Any, known: KnownLatents | None) -> Any:
    return model if known is None else known.around_model(model)


def _around_denoiser(denoiser: CompVisDenoiser, known: KnownLatents | None) -> Any:
    return denoiser if known is None else known.around_denoiser(denoiser)


def _paste_known(latents: torch.Tensor, known: KnownLatents | None) -> torch.Tensor:
    return latents if known is None else known.paste(latents)


def _sample_compvis(spec: SamplerSpec, model: Any, steps: int, shape: tuple[int, ...], cond: Any, uncond: Any,
                    scale: float, noise: ImageNoise, x_T: torch.Tensor, eta: float | None,
                    callback: Callable[[dict[str, Any]], None] | None, disable: bool | None) -> torch.Tensor:
    sampler = _load_compvis_sampler(spec.compvis)(model)
    img_callback = None
    if callback is not None:
        def img_callback(pred_x0: torch.Tensor, i: int) -> None:
            callback({"i": i, "denoised": pred_x0})
    samples, _ = sampler.sample(S=steps, batch_size=shape[0], shape=shape[1:], conditioning=cond,
                                eta=0.0 if eta is None else eta, x_T=x_T, noise=noise, verbose=not disable,
                                unconditional_guidance_scale=scale, unconditional_conditioning=uncond,
                                img_callback=img_callback)
    return samples
