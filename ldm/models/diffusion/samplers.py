"""Every sampler by name: the registry of names users know ("Euler a", "DPM++ 2M Karras", "ddim", ...), the names
AUTOMATIC1111's infotexts print for them, and one entry point that runs any of them.

Names match case- and separator-insensitively ("DPM++ 2M Karras" == "dpmpp_2m_karras" == "dpmpp-2m-karras"); every
k-diffusion sampler that follows a schedule also has a Karras-schedule variant, named with a " Karras" / "_karras"
suffix. A registry entry is a `SamplerSpec` (sampler_specs.py): a `KSamplerSpec` (a k-diffusion style function over
a sigma schedule), a `CompVisSamplerSpec` (a CompVis sampler class) or the `DDIMCFGPPSpec` of AUTOMATIC1111's DDIM
CFG++; all run through the same `sample` / `sample_img2img` methods.

Entries carry AUTOMATIC1111's facts about each sampler for callers that reproduce its images: `uses_ensd` (it writes
ENSD into the infotext), `brownian_noise` (Brownian-tree noise seeded with the images' seeds),
`discard_next_to_last_sigma` and `automatic_schedule` (the schedule its "Automatic" schedule type picks).
"""
from __future__ import annotations

import dataclasses
import re
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from ldm.models.diffusion import k_sampling
from ldm.models.diffusion.brownian import RandnSource
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.dpm_solver import DPMSolverSampler
from ldm.models.diffusion.k_denoisers import LCMCompVisDenoiser
from ldm.models.diffusion.noise import ImageNoise
from ldm.models.diffusion.plms import PLMSSampler
from ldm.models.diffusion.sampler_specs import CompVisSamplerSpec, DDIMCFGPPSpec, KSamplerSpec, SamplerSpec
from ldm.models.diffusion.uni_pc import sample_unipc

if TYPE_CHECKING:
    from ldm.models.diffusion.inpainting import KnownLatents

KARRAS_SUFFIX = "karras"
# Schedule suffixes of AUTOMATIC1111's display names ("DPM++ 2M Karras"), by their squeezed spelling
DISPLAY_SUFFIXES = {"karras": "Karras", "exponential": "Exponential"}

Callback = Callable[[dict[str, Any]], None]


_SAMPLERS: tuple[KSamplerSpec, ...] = (
    KSamplerSpec(name="euler", display_name="Euler", function=k_sampling.sample_euler),
    KSamplerSpec(name="euler_a", display_name="Euler a", aliases=("euler_ancestral",), stochastic=True,
                 uses_ensd=True, function=k_sampling.sample_euler_ancestral),
    KSamplerSpec(name="heun", display_name="Heun", function=k_sampling.sample_heun),
    KSamplerSpec(name="dpm2", display_name="DPM2", discard_next_to_last_sigma=True, automatic_schedule="karras",
                 function=k_sampling.sample_dpm_2),
    KSamplerSpec(name="dpm2_a", display_name="DPM2 a", aliases=("dpm2_ancestral",), stochastic=True,
                 uses_ensd=True, discard_next_to_last_sigma=True, automatic_schedule="karras",
                 function=k_sampling.sample_dpm_2_ancestral),
    KSamplerSpec(name="lms", display_name="LMS", function=k_sampling.sample_lms),
    KSamplerSpec(name="dpmpp_2s_a", display_name="DPM++ 2S a", aliases=("dpmpp_2s_ancestral",), stochastic=True,
                 uses_ensd=True, automatic_schedule="karras", function=k_sampling.sample_dpmpp_2s_ancestral),
    KSamplerSpec(name="dpmpp_2m", display_name="DPM++ 2M", automatic_schedule="karras",
                 function=k_sampling.sample_dpmpp_2m),
    KSamplerSpec(name="dpmpp_sde", display_name="DPM++ SDE", stochastic=True, brownian_noise=True,
                 automatic_schedule="karras", function=k_sampling.sample_dpmpp_sde),
    KSamplerSpec(name="dpmpp_2m_sde", display_name="DPM++ 2M SDE", stochastic=True, brownian_noise=True,
                 automatic_schedule="exponential", function=k_sampling.sample_dpmpp_2m_sde),
    KSamplerSpec(name="dpmpp_2m_sde_heun", display_name="DPM++ 2M SDE Heun", stochastic=True, brownian_noise=True,
                 automatic_schedule="exponential", function=k_sampling.sample_dpmpp_2m_sde,
                 knobs=(("solver_type", "heun"),)),
    KSamplerSpec(name="dpmpp_3m_sde", display_name="DPM++ 3M SDE", stochastic=True, brownian_noise=True,
                 discard_next_to_last_sigma=True, automatic_schedule="exponential",
                 function=k_sampling.sample_dpmpp_3m_sde),
    KSamplerSpec(name="unipc", display_name="UniPC", aliases=("uni_pc",), function=sample_unipc, schedule="discrete"),
    # AUTOMATIC1111 runs these two with its ancestral eta, 1
    KSamplerSpec(name="dpm_fast", display_name="DPM fast", stochastic=True, uses_ensd=True,
                 function=k_sampling.sample_dpm_fast, knobs=(("eta", 1.0),), takes_sigma_range=True, hand_off=False,
                 karras_variant=False),
    KSamplerSpec(name="dpm_adaptive", display_name="DPM adaptive", aliases=("dpm_ad",), stochastic=True,
                 uses_ensd=True, function=k_sampling.sample_dpm_adaptive, knobs=(("eta", 1.0),),
                 takes_sigma_range=True, hand_off=False, karras_variant=False),
    KSamplerSpec(name="restart", display_name="Restart", automatic_schedule="karras",
                 function=k_sampling.sample_restart),
    KSamplerSpec(name="lcm", display_name="LCM", function=k_sampling.sample_lcm, denoiser=LCMCompVisDenoiser,
                 karras_variant=False),
    KSamplerSpec(name="euler_cfg_pp", display_name="Euler CFG++", function=k_sampling.sample_euler_cfg_pp),
    KSamplerSpec(name="euler_ancestral_cfg_pp", display_name="Euler Ancestral CFG++", aliases=("euler_a_cfg_pp",),
                 stochastic=True, function=k_sampling.sample_euler_ancestral_cfg_pp),
)
_OTHER_SAMPLERS: tuple[SamplerSpec, ...] = (
    CompVisSamplerSpec(name="ddim", display_name="DDIM", stochastic=True, sampler_class=DDIMSampler),
    CompVisSamplerSpec(name="plms", display_name="PLMS", sampler_class=PLMSSampler),
    CompVisSamplerSpec(name="dpm_solver", display_name="DPM-Solver", sampler_class=DPMSolverSampler),
    DDIMCFGPPSpec(name="ddim_cfg_pp", display_name="DDIM CFG++", stochastic=True),
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
    specs = [*_SAMPLERS, *(_karras_variant(spec) for spec in _SAMPLERS if spec.karras_variant), *_OTHER_SAMPLERS]
    by_key: dict[str, SamplerSpec] = {}
    for spec in specs:
        for alias in (spec.name, *spec.aliases):
            key = normalize_name(alias)
            if by_key.setdefault(key, spec) is not spec:
                raise ValueError(f"sampler name {alias!r} is taken twice ({by_key[key].name} and {spec.name})")
    display = {normalize_name(alias): spec.display_name
               for spec in (*_SAMPLERS, *_OTHER_SAMPLERS) for alias in (spec.name, *spec.aliases)}
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
           known: KnownLatents | None = None, *, quantize: bool = False, sigmas: torch.Tensor | None = None,
           discard_next_to_last_sigma: bool = False, tree_seeds: Sequence[int] | None = None,
           tree_randn: RandnSource | None = None, ddim_discretize: str = "uniform") -> torch.Tensor:
    """Latents [B, C, H, W] = `shape` sampled by sampler `name` in `steps` steps, with classifier-free guidance
    `scale` between `cond` and `uncond`.

    `x_T` is unit-variance starting noise (drawn from `noise` when None); the k-diffusion samplers start from
    x_T * sigmas[0] and take all further noise from `noise`, so each image depends only on its own seed. `eta`
    None keeps each sampler's default (1 for ancestral and SDE samplers, 0 for DDIM). `callback` receives a dict
    with at least "i" (step index) and "denoised" (the current clean-latent estimate) once per step. `known`
    (inpainting with a text-to-image model, see inpainting.py) pastes known latents in around every model call and
    into the result.

    The k-diffusion samplers also take (DDIM, PLMS, DPM-Solver ignore them, refusing `sigmas`): `quantize`, to
    call the model at integer timesteps only (default: fractional ones, as k-diffusion and AUTOMATIC1111 do);
    `sigmas`, the run's own schedule (steps + 1 decreasing levels ending at 0) instead of the entry's;
    `discard_next_to_last_sigma`, AUTOMATIC1111's rule for DPM2, DPM2 a and DPM++ 3M SDE (see the entries'
    attribute); `tree_seeds` and `tree_randn`, the seeds and the random source of the Brownian trees of the SDE
    samplers (default: `noise`'s image seeds and random source, as AUTOMATIC1111 seeds them; see
    `KSamplerSpec.noise_sampler`). DDIM and PLMS take `ddim_discretize` instead: their timesteps' spacing,
    "uniform" (CompVis', diffusers' "leading" with steps_offset 1) or "trailing" (see `compvis_spacing`).
    """
    spec = resolve_sampler(name)
    shape = tuple(int(size) for size in shape)
    spec.check_request(steps, shape, noise, eta)
    if x_T is None:
        x_T = noise.randn(shape, device=model.device, dtype=torch.float32)
    elif tuple(x_T.shape) != shape:
        raise ValueError(f"x_T has shape {tuple(x_T.shape)}, expected {shape}")
    options = _k_options(quantize, sigmas, discard_next_to_last_sigma, tree_seeds, tree_randn)
    if ddim_discretize != "uniform":
        if not getattr(spec, "takes_ddim_discretize", False):
            raise ValueError(f"sampler {name!r} takes no ddim_discretize: only ddim and plms space their timesteps")
        options["ddim_discretize"] = ddim_discretize
    latents = spec.sample(model, steps, x_T, cond, uncond, scale, noise, eta=eta, callback=callback, disable=disable,
                          known=known, **options)
    return _paste_known(latents, known)


# schedule types (their labels) that DDIM and PLMS run as a spacing of their timesteps
COMPVIS_SPACINGS = {"Automatic": "uniform", "Leading": "uniform", "Trailing": "trailing"}


def compvis_spacing(sampler: str, schedule_label: str | None) -> str | None:
    """The `ddim_discretize` a CompVis sampler (DDIM, PLMS) runs a schedule type as: "uniform" for Automatic and
    diffusers' Leading (with steps_offset 1, CompVis' own spacing), "trailing" for Trailing; None when the sampler
    or the schedule type has no such spacing."""
    spec = resolve_sampler(sampler)
    if not getattr(spec, "takes_ddim_discretize", False):
        return None
    return COMPVIS_SPACINGS.get(schedule_label or "Automatic")


def _k_options(quantize: bool, sigmas: torch.Tensor | None, discard_next_to_last_sigma: bool,
               tree_seeds: Sequence[int] | None, tree_randn: RandnSource | None) -> dict[str, Any]:
    return {"quantize": quantize, "sigmas": sigmas, "discard_next_to_last_sigma": discard_next_to_last_sigma,
            "tree_seeds": tree_seeds, "tree_randn": tree_randn}


IMG2IMG_RULES = ("diffusers", "a1111")
A1111_MAX_STRENGTH = 0.999  # AUTOMATIC1111's setup_img2img_steps caps the denoising strength here


def img2img_steps(steps: int, strength: float, rule: str = "diffusers") -> int:
    """How many of `steps` an img2img run with `strength` takes. "diffusers": int(strength * steps), as CompVis
    counts t_enc and diffusers its init timestep. "a1111": one more, int(min(strength, 0.999) * steps) + 1, as
    AUTOMATIC1111's k-diffusion img2img runs `sigmas[steps - t_enc - 1:]` (sd_samplers_kdiffusion.sample_img2img,
    with sd_samplers_common.setup_img2img_steps' t_enc): from one sigma higher, one step more."""
    if not 0.0 <= strength <= 1.0:  # also refuses NaN
        raise ValueError(f"strength must lie in [0, 1] (0 keeps the image, 1 replaces it), got {strength}")
    if rule not in IMG2IMG_RULES:
        raise ValueError(f"img2img steps rule {rule!r} is not one of {', '.join(IMG2IMG_RULES)}")
    if rule == "a1111":
        return int(min(strength, A1111_MAX_STRENGTH) * steps) + 1
    return int(strength * steps)


def img2img_rule(name: str, rule: str) -> str:
    """The rule sampler `name` counts its img2img steps by: `rule` for the k-diffusion samplers, "diffusers" for
    the others (DDIM runs CompVis' img2img whatever the rule)."""
    return rule if isinstance(resolve_sampler(name), KSamplerSpec) else "diffusers"


def sample_img2img(model: Any, name: str, steps: int, x_init: torch.Tensor, strength: float, cond: Any, uncond: Any,
                   scale: float, noise: ImageNoise, eta: float | None = None, disable: bool | None = None,
                   start_noise: torch.Tensor | None = None, known: KnownLatents | None = None, *,
                   quantize: bool = False, sigmas: torch.Tensor | None = None,
                   discard_next_to_last_sigma: bool = False, tree_seeds: Sequence[int] | None = None,
                   tree_randn: RandnSource | None = None, steps_rule: str = "diffusers") -> torch.Tensor:
    """Latents [B, C, H, W] made from clean latents `x_init` of that shape: noised part of the way, then denoised by
    sampler `name` over the last t_enc = int(`strength` * `steps`) steps of its `steps`-step schedule (SDEdit,
    Meng et al. 2021); with `steps_rule` "a1111" the k-diffusion samplers count t_enc as AUTOMATIC1111 does (one
    more, see `img2img_steps`). The noise comes from `noise`, after whatever the caller drew from it for `x_init`.

    ddim does what CompVis' img2img does: `stochastic_encode` to DDIM step t_enc, one step above the first step it
    takes, then `decode` through t_enc steps; t_enc = 0 returns those noised latents. Where t_enc is past the last
    DDIM step (strength 1, on which CompVis fails with an index error) it starts from pure noise, as txt2img does.
    The k-diffusion samplers noise to their schedule's sigma at the first step they take and run the schedule's last
    t_enc + 1 sigmas, as diffusers does (and AUTOMATIC1111, whose own t_enc is one less); t_enc = 0 returns
    `x_init`. plms and dpm_solver cannot start from an image (CompVis refuses plms there too); DDIM CFG++ noises as
    AUTOMATIC1111 does (`DDIMCFGPPSpec`).
    `start_noise` is the unit noise to noise `x_init` with (drawn from `noise` when None); `known` and the
    k-diffusion keywords are as for `sample` (a given `sigmas` is the whole schedule, of which the last t_enc + 1
    run; the Brownian trees span all of it, as AUTOMATIC1111's do).
    """
    spec = resolve_sampler(name)
    spec.check_request(steps, tuple(x_init.shape), noise, eta)
    t_enc = img2img_steps(steps, strength, img2img_rule(name, steps_rule))
    latents = spec.sample_img2img(model, steps, x_init, t_enc, cond, uncond, scale, noise, eta=eta, disable=disable,
                                  start_noise=start_noise, known=known,
                                  **_k_options(quantize, sigmas, discard_next_to_last_sigma, tree_seeds, tree_randn))
    return _paste_known(latents, known)


def encoded_latents(model: Any, posterior: Any, noise: ImageNoise) -> torch.Tensor:
    """One sample of an encoded image's autoencoder `posterior` per seed of `noise` ([B, C, h, w] float32, times the
    model's scale factor).

    Each takes its noise from its own image's generator, as the next draw of that image's stream: diffusers'
    img2img and inpainting pipelines draw the same with one generator per image, and the image then depends on its
    seed alone.
    """
    if noise.rng == "cpu":
        return torch.cat([model.get_first_stage_encoding(posterior, generator=generator)
                          for generator in noise.generators]).float()
    draws = noise.stream_randn((len(noise), *posterior.mean.shape[1:]))  # gpu / nv: the same stream's numbers
    latents = posterior.mean + posterior.std * draws.to(device=posterior.mean.device, dtype=posterior.mean.dtype)
    return (model.scale_factor * latents).float()


def resolves_img2img(name: str) -> bool:
    """Whether `sample_img2img` can run sampler `name` (ddim and the k-diffusion samplers can)."""
    return resolve_sampler(name).can_start_from_image


def _paste_known(latents: torch.Tensor, known: KnownLatents | None) -> torch.Tensor:
    return latents if known is None else known.paste(latents)
