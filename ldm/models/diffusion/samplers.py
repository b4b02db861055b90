"""Every sampler by name: the registry of names users know ("Euler a", "DPM++ 2M Karras", "ddim", ...), the names
AUTOMATIC1111's infotexts print for them, and one entry point that runs any of them.

Names match case- and separator-insensitively ("DPM++ 2M Karras" == "dpmpp_2m_karras" == "dpmpp-2m-karras"); every
k-diffusion sampler also has a Karras-schedule variant, named with a " Karras" / "_karras" suffix. A registry entry
is a `SamplerSpec`: a `KSamplerSpec` (a k-diffusion style function over a sigma schedule) or a `CompVisSamplerSpec`
(a CompVis sampler class); both run through the same `sample` / `sample_img2img` methods.
"""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from ldm.models.diffusion import k_sampling
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.dpm_solver import DPMSolverSampler
from ldm.models.diffusion.k_denoisers import CompVisDenoiser, make_denoiser
from ldm.models.diffusion.noise import ImageNoise
from ldm.models.diffusion.plms import PLMSSampler
from ldm.models.diffusion.uni_pc import sample_unipc

if TYPE_CHECKING:
    from ldm.models.diffusion.inpainting import KnownLatents

KARRAS_SUFFIX = "karras"
# Schedule suffixes of AUTOMATIC1111's display names ("DPM++ 2M Karras"), by their squeezed spelling
DISPLAY_SUFFIXES = {"karras": "Karras", "exponential": "Exponential"}
SCHEDULES = ("model", "discrete", "karras")

Callback = Callable[[dict[str, Any]], None]


@dataclass(frozen=True, kw_only=True)
class SamplerSpec:
    """One registered sampler: its canonical `name`, the `display_name` AUTOMATIC1111 prints, the other spellings
    it answers to (`aliases`), and whether it draws noise and so takes an eta (`stochastic`)."""

    name: str
    display_name: str
    aliases: tuple[str, ...] = ()
    stochastic: bool = False

    compvis = None  # the import path of a CompVis sampler class; None for the k-diffusion samplers

    @property
    def can_start_from_image(self) -> bool:
        """Whether `sample_img2img` runs this sampler."""
        return False

    @property
    def can_hand_off(self) -> bool:
        """Whether a run can switch models mid-schedule (SDXL base to refiner, refiner_handoff.py)."""
        return False

    def check_request(self, steps: int, shape: tuple[int, ...], noise: ImageNoise, eta: float | None) -> None:
        """ValueError unless `steps`, the latents' `shape` [B, C, H, W] (B = one seed of `noise` each) and `eta`
        suit this sampler."""
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        if len(shape) != 4 or shape[0] != len(noise):
            raise ValueError(f"shape {shape} must be [batch, channels, height, width] with batch = {len(noise)}, "
                             "the number of seeds in `noise`")
        if eta is not None and eta != 0 and not self.stochastic:
            raise ValueError(f"sampler {self.name!r} is deterministic and takes no eta (got eta={eta}); "
                             "use an ancestral or SDE sampler, or ddim, for eta > 0")

    def sample(self, model: Any, steps: int, x_T: torch.Tensor, cond: Any, uncond: Any, scale: float,
               noise: ImageNoise, eta: float | None = None, callback: Callback | None = None,
               disable: bool | None = None, known: KnownLatents | None = None) -> torch.Tensor:
        """Latents shaped like the unit starting noise `x_T`, as the module-level `sample` describes (the known
        latents are not pasted into the result here)."""
        raise NotImplementedError

    def sample_img2img(self, model: Any, steps: int, x_init: torch.Tensor, t_enc: int, cond: Any, uncond: Any,
                       scale: float, noise: ImageNoise, eta: float | None = None, disable: bool | None = None,
                       start_noise: torch.Tensor | None = None, known: KnownLatents | None = None) -> torch.Tensor:
        """Latents from clean latents `x_init` over the last `t_enc` of `steps` steps, as the module-level
        `sample_img2img` describes (the known latents are not pasted into the result here)."""
        raise ValueError(f"sampler {self.name!r} cannot start from an image: use ddim or a k-diffusion sampler "
                         f"(euler, euler_a, dpmpp_2m, dpmpp_2m_karras, unipc, ...)")


@dataclass(frozen=True, kw_only=True)
class KSamplerSpec(SamplerSpec):
    """A k-diffusion style `function(denoiser, x, sigmas, extra_args, callback, disable, **knobs)` on a sigma
    `schedule`: "model" (k-diffusion's get_sigmas), "discrete" (diffusers' linspace) or "karras"."""

    function: Callable[..., torch.Tensor]
    schedule: str = "model"

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule {self.schedule!r} of sampler {self.name!r} is not one of {SCHEDULES}")

    @property
    def can_start_from_image(self) -> bool:
        return True

    @property
    def can_hand_off(self) -> bool:
        return True

    def sigmas(self, denoiser: CompVisDenoiser, steps: int) -> torch.Tensor:
        """The `steps + 1` decreasing noise levels of a `steps`-step run, ending at 0."""
        if self.schedule == "karras":
            return denoiser.schedule.get_sigmas_karras(steps)
        if self.schedule == "discrete":
            return denoiser.schedule.get_sigmas_discrete(steps)
        return denoiser.schedule.get_sigmas(steps)

    def run(self, denoiser: Any, x: torch.Tensor, sigmas: torch.Tensor, cond: Any, uncond: Any, scale: float,
            noise: ImageNoise, eta: float | None = None, callback: Callback | None = None,
            disable: bool | None = None) -> torch.Tensor:
        """The sampler from `x` (at noise level sigmas[0]) down `sigmas`, guided with `scale` between `cond` and
        `uncond`, its step noise from `noise`; `eta` None keeps the function's default."""
        knobs: dict[str, Any] = {"noise_sampler": noise.noise_sampler(x)}
        if eta is not None and self.stochastic:
            knobs["eta"] = eta
        extra_args = {"cond": cond, "uncond": uncond, "cond_scale": scale}
        return self.function(denoiser, x, sigmas, extra_args=extra_args, callback=callback, disable=disable, **knobs)

    def sample(self, model: Any, steps: int, x_T: torch.Tensor, cond: Any, uncond: Any, scale: float,
               noise: ImageNoise, eta: float | None = None, callback: Callback | None = None,
               disable: bool | None = None, known: KnownLatents | None = None) -> torch.Tensor:
        denoiser = make_denoiser(model)
        sigmas = self.sigmas(denoiser, steps).to(x_T.device)
        return self.run(_around_denoiser(denoiser, known), x_T * sigmas[0], sigmas, cond, uncond, scale, noise, eta,
                        callback, disable)

    def sample_img2img(self, model: Any, steps: int, x_init: torch.Tensor, t_enc: int, cond: Any, uncond: Any,
                       scale: float, noise: ImageNoise, eta: float | None = None, disable: bool | None = None,
                       start_noise: torch.Tensor | None = None, known: KnownLatents | None = None) -> torch.Tensor:
        denoiser = make_denoiser(model)
        sigmas = self.sigmas(denoiser, steps).to(x_init.device)[steps - t_enc:]
        x = x_init + (noise.randn_like(x_init) if start_noise is None else start_noise) * sigmas[0]
        if t_enc == 0:
            return x
        return self.run(_around_denoiser(denoiser, known), x, sigmas, cond, uncond, scale, noise, eta, None, disable)


@dataclass(frozen=True, kw_only=True)
class CompVisSamplerSpec(SamplerSpec):
    """A CompVis sampler class (`sampler_class(model).sample(S=..., ...)`); those with `stochastic_encode` and
    `decode` (DDIM) also start from an image, as CompVis' img2img script runs them."""

    sampler_class: type

    @property
    def compvis(self) -> str:
        return f"{self.sampler_class.__module__}:{self.sampler_class.__qualname__}"

    @property
    def can_start_from_image(self) -> bool:
        return hasattr(self.sampler_class, "stochastic_encode") and hasattr(self.sampler_class, "decode")

    def sample(self, model: Any, steps: int, x_T: torch.Tensor, cond: Any, uncond: Any, scale: float,
               noise: ImageNoise, eta: float | None = None, callback: Callback | None = None,
               disable: bool | None = None, known: KnownLatents | None = None) -> torch.Tensor:
        sampler = self.sampler_class(_around_model(model, known))
        img_callback = None
        if callback is not None:
            def img_callback(pred_x0: torch.Tensor, i: int) -> None:
                callback({"i": i, "denoised": pred_x0})
        samples, _ = sampler.sample(S=steps, batch_size=x_T.shape[0], shape=x_T.shape[1:], conditioning=cond,
                                    eta=0.0 if eta is None else eta, x_T=x_T, noise=noise, verbose=not disable,
                                    unconditional_guidance_scale=scale, unconditional_conditioning=uncond,
                                    img_callback=img_callback)
        return samples

    def sample_img2img(self, model: Any, steps: int, x_init: torch.Tensor, t_enc: int, cond: Any, uncond: Any,
                       scale: float, noise: ImageNoise, eta: float | None = None, disable: bool | None = None,
                       start_noise: torch.Tensor | None = None, known: KnownLatents | None = None) -> torch.Tensor:
        if not self.can_start_from_image:
            return super().sample_img2img(model, steps, x_init, t_enc, cond, uncond, scale, noise, eta, disable,
                                          start_noise, known)
        sampler = self.sampler_class(_around_model(model, known))
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


_SAMPLERS: tuple[SamplerSpec, ...] = (
    KSamplerSpec(name="euler", display_name="Euler", function=k_sampling.sample_euler),
    KSamplerSpec(name="euler_a", display_name="Euler a", aliases=("euler_ancestral",), stochastic=True,
                 function=k_sampling.sample_euler_ancestral),
    KSamplerSpec(name="heun", display_name="Heun", function=k_sampling.sample_heun),
    KSamplerSpec(name="dpm2", display_name="DPM2", function=k_sampling.sample_dpm_2),
    KSamplerSpec(name="dpm2_a", display_name="DPM2 a", aliases=("dpm2_ancestral",), stochastic=True,
                 function=k_sampling.sample_dpm_2_ancestral),
    KSamplerSpec(name="lms", display_name="LMS", function=k_sampling.sample_lms),
    KSamplerSpec(name="dpmpp_2s_a", display_name="DPM++ 2S a", aliases=("dpmpp_2s_ancestral",), stochastic=True,
                 function=k_sampling.sample_dpmpp_2s_ancestral),
    KSamplerSpec(name="dpmpp_2m", display_name="DPM++ 2M", function=k_sampling.sample_dpmpp_2m),
    KSamplerSpec(name="dpmpp_sde", display_name="DPM++ SDE", stochastic=True, function=k_sampling.sample_dpmpp_sde),
    KSamplerSpec(name="dpmpp_2m_sde", display_name="DPM++ 2M SDE", stochastic=True,
                 function=k_sampling.sample_dpmpp_2m_sde),
    KSamplerSpec(name="unipc", display_name="UniPC", aliases=("uni_pc",), function=sample_unipc, schedule="discrete"),
)
_COMPVIS_SAMPLERS: tuple[SamplerSpec, ...] = (
    CompVisSamplerSpec(name="ddim", display_name="DDIM", stochastic=True, sampler_class=DDIMSampler),
    CompVisSamplerSpec(name="plms", display_name="PLMS", sampler_class=PLMSSampler),
    CompVisSamplerSpec(name="dpm_solver", display_name="DPM-Solver", sampler_class=DPMSolverSampler),
)


def _karras_variant(spec: KSamplerSpec) -> KSamplerSpec:
    return dataclasses.replace(spec, name=f"{spec.name}_{KARRAS_SUFFIX}", display_name=f"{spec.display_name} Karras",
                               aliases=tuple(f"{alias}_{KARRAS_SUFFIX}" for alias in spec.aliases), schedule="karras")


def normalize_name(name: str) -> str:
    """"DPM++ 2M Karras" -> "dpmpp2mkarras": lower case, "+" as "p", separators dropped."""
    return re.sub(r"[^a-z0-9]", "", name.lower().replace("+", "p"))


def _display_key(name: str) -> str:
    """`normalize_name`, except that only "++" becomes "pp": the spelling recorded names have always been read with."""
    return re.sub(r"[^a-z0-9]", "", name.lower().replace("++", "pp"))


def _build_registry() -> tuple[dict[str, SamplerSpec], list[str], dict[str, str]]:
    specs = [*_SAMPLERS, *(_karras_variant(spec) for spec in _SAMPLERS), *_COMPVIS_SAMPLERS]
    by_key: dict[str, SamplerSpec] = {}
    for spec in specs:
        for alias in (spec.name, *spec.aliases):
            key = normalize_name(alias)
            if by_key.setdefault(key, spec) is not spec:
                raise ValueError(f"sampler name {alias!r} is taken twice ({by_key[key].name} and {spec.name})")
    display = {normalize_name(alias): spec.display_name
               for spec in (*_SAMPLERS, *_COMPVIS_SAMPLERS) for alias in (spec.name, *spec.aliases)}
    return by_key, [spec.name for spec in specs], display


_REGISTRY, _NAMES, _DISPLAY_NAMES = _build_registry()


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


def sampler_display_name(name: str) -> str:
    """The name AUTOMATIC1111's infotexts give sampler `name` ("euler_a" -> "Euler a", "dpmpp_2m_karras" ->
    "DPM++ 2M Karras", "ddim" -> "DDIM"), a " Karras" or " Exponential" schedule suffix included; a name that is
    no sampler's passes through unchanged."""
    key = _display_key(name)
    for suffix, label in DISPLAY_SUFFIXES.items():
        if key.endswith(suffix) and key[: -len(suffix)] in _DISPLAY_NAMES:
            return f"{_DISPLAY_NAMES[key[: -len(suffix)]]} {label}"
    return _DISPLAY_NAMES.get(key, name)


def sample(model: Any, name: str, steps: int, shape: Sequence[int], cond: Any, uncond: Any, scale: float,
           noise: ImageNoise, x_T: torch.Tensor | None = None, eta: float | None = None,
           callback: Callback | None = None, disable: bool | None = None,
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
    spec.check_request(steps, shape, noise, eta)
    if x_T is None:
        x_T = noise.randn(shape, device=model.device, dtype=torch.float32)
    elif tuple(x_T.shape) != shape:
        raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected {shape}")
    latents = spec.sample(model, steps, x_T, cond, uncond, scale, noise, eta=eta, callback=callback, disable=disable,
                          known=known)
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
    spec.check_request(steps, tuple(x_init.shape), noise, eta)
    t_enc = img2img_steps(steps, strength)
    latents = spec.sample_img2img(model, steps, x_init, t_enc, cond, uncond, scale, noise, eta=eta, disable=disable,
                                  start_noise=start_noise, known=known)
    return _paste_known(latents, known)


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
    return resolve_sampler(name).can_start_from_image


def _around_model(model: Any, known: KnownLatents | None) -> Any:
    return model if known is None else known.around_model(model)


def _around_denoiser(denoiser: CompVisDenoiser, known: KnownLatents | None) -> Any:
    return denoiser if known is None else known.around_denoiser(denoiser)


def _paste_known(latents: torch.Tensor, known: KnownLatents | None) -> torch.Tensor:
    return latents if known is None else known.paste(latents)
