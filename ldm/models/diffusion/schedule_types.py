"""AUTOMATIC1111's schedule types ("Schedule type" in its infotexts) and its samplers' defaults, to its numbers.

A schedule type turns a step count into the decreasing sigmas a k-diffusion sampler runs through:
`SCHEDULE_TYPES` holds AUTOMATIC1111's twelve (Automatic, Uniform, Karras, Exponential, Polyexponential, SGM Uniform,
KL Optimal, Align Your Steps, Simple, Normal, DDIM, Beta) in its order, each a `ScheduleType` called as
`schedule_type(n, sigma_min, sigma_max, schedule, device, options)`. `A1111_SAMPLERS` is its sampler table: which
schedule "Automatic" means for each sampler, and which samplers drop the next-to-last sigma, reseed their noise with
the eta noise seed delta, or draw Brownian-tree noise. `a1111_sigmas` puts both together as its
`KDiffusionSampler.get_sigmas` does, and `split_sampler_and_schedule` reads the combined names of older infotexts
("DPM++ 2M Karras").

`SPACING_TYPES` adds diffusers' timestep spacings beyond AUTOMATIC1111's twelve (Leading, Linspace, Trailing, and
LCM, the timesteps of diffusers' `LCMScheduler`), for the few-step models whose authors name them (SDXL-Lightning:
Euler with "trailing"); they are looked up, resolved and recorded like the others ("Schedule type: Trailing").

The arithmetic follows AUTOMATIC1111 and k-diffusion operation for operation (float32 torch ops, numpy float64
where they use numpy, per-element 0-d tensor ops where they loop), so on the CPU the sigmas equal theirs bit for
bit (tests/test_schedule_types.py); on a GPU their model-dependent types (Uniform, SGM Uniform, Normal) may differ in
the last bit, as theirs do between devices. Beta's quantiles come from `beta_quantile` here (they use scipy).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable, Protocol

import numpy as np
import torch

from ldm.models.diffusion.k_schedules import (append_zero, get_sigmas_exponential, get_sigmas_karras,
                                              get_sigmas_polyexponential)

Device = torch.device | str


class DiscreteSigmas(Protocol):
    """A discrete model schedule (`NoiseSchedule`, `CompVisDenoiser`): its float32 noise levels, increasing with t."""

    sigmas: torch.Tensor
    log_sigmas: torch.Tensor


@dataclass(frozen=True)
class ScheduleOptions:
    """AUTOMATIC1111's settings that change some schedule types: `rho` for Karras (default 7) and Polyexponential
    (default 1), `sdxl` for Align Your Steps' table, `beta_alpha` / `beta_beta` for Beta (0.6 and 0.6); and
    diffusers' `steps_offset` for Leading."""

    rho: float | None = None
    sdxl: bool = False
    beta_alpha: float = 0.6
    beta_beta: float = 0.6
    steps_offset: int = 1  # diffusers' "leading" shift: 1 in the scheduler configs of SD 1.x, 2.x and XL


ScheduleFunction = Callable[[int, float, float, "DiscreteSigmas | None", Device, ScheduleOptions], torch.Tensor]


@dataclass(frozen=True)
class ScheduleType:
    """One schedule type: its `name` ("sgm_uniform"), the `label` AUTOMATIC1111 shows and records ("SGM Uniform"),
    other spellings (`aliases`), and whether it reads the model's own discrete schedule (`needs_model`).
    "Automatic" has no function: it stands for the sampler's default (`A1111Sampler.default_schedule`)."""

    name: str
    label: str
    function: ScheduleFunction | None
    needs_model: bool = False
    aliases: tuple[str, ...] = ()

    def __call__(self, n: int, sigma_min: float, sigma_max: float, schedule: DiscreteSigmas | None = None,
                 device: Device = "cpu", options: ScheduleOptions | None = None) -> torch.Tensor:
        """The sigmas of an `n`-step run from `sigma_max` down (all types but KL Optimal end at 0; KL Optimal's last
        sigma is `sigma_min`, as in AUTOMATIC1111). `schedule` is the model's, needed where `needs_model`."""
        if self.function is None:
            raise ValueError("schedule type 'Automatic' means the sampler's default: resolve it with "
                             "a1111_sigmas or A1111Sampler.default_schedule")
        if n < 1:
            raise ValueError(f"a schedule needs at least one step, got n={n}")
        if self.needs_model and schedule is None:
            raise ValueError(f"schedule type {self.label!r} reads the model's own sigmas: pass its NoiseSchedule")
        return self.function(n, float(sigma_min), float(sigma_max), schedule, device, options or ScheduleOptions())


# --- the schedule types -------------------------------------------------------------------------------------------
def _karras(n: int, sigma_min: float, sigma_max: float, schedule: DiscreteSigmas | None, device: Device,
            options: ScheduleOptions) -> torch.Tensor:
    rho = 7.0 if options.rho is None else options.rho
    return get_sigmas_karras(n, sigma_min, sigma_max, rho=rho, device=device)


def _exponential(n: int, sigma_min: float, sigma_max: float, schedule: DiscreteSigmas | None, device: Device,
                 options: ScheduleOptions) -> torch.Tensor:
    return get_sigmas_exponential(n, sigma_min, sigma_max, device=device)


def _polyexponential(n: int, sigma_min: float, sigma_max: float, schedule: DiscreteSigmas | None, device: Device,
                     options: ScheduleOptions) -> torch.Tensor:
    rho = 1.0 if options.rho is None else options.rho
    return get_sigmas_polyexponential(n, sigma_min, sigma_max, rho=rho, device=device)


def _uniform(n: int, sigma_min: float, sigma_max: float, schedule: DiscreteSigmas | None, device: Device,
             options: ScheduleOptions) -> torch.Tensor:
    """k-diffusion's `get_sigmas(n)`: n timesteps evenly spaced from T-1 down to 0, whatever sigma_min/max say."""
    sigmas = schedule.sigmas
    t = torch.linspace(sigmas.numel() - 1, 0, n, device=sigmas.device)
    return append_zero(_t_to_sigma(schedule, t)).to(device)


def _sgm_uniform(n: int, sigma_min: float, sigma_max: float, schedule: DiscreteSigmas | None, device: Device,
                 options: ScheduleOptions) -> torch.Tensor:
    """n + 1 timesteps evenly spaced between those of sigma_max and sigma_min, the last dropped for 0
    (Stability's sgm "uniform" discretisation)."""
    start, end = _sigma_to_t(schedule, sigma_max), _sigma_to_t(schedule, sigma_min)
    timesteps = torch.linspace(start, end, n + 1)[:-1]
    return torch.tensor([float(_t_to_sigma(schedule, t)) for t in timesteps] + [0.0]).to(device)


def _normal(n: int, sigma_min: float, sigma_max: float, schedule: DiscreteSigmas | None, device: Device,
            options: ScheduleOptions) -> torch.Tensor:
    """n timesteps evenly spaced from sigma_max's to sigma_min's, then 0 (ComfyUI's "normal")."""
    start, end = _sigma_to_t(schedule, sigma_max), _sigma_to_t(schedule, sigma_min)
    timesteps = torch.linspace(start, end, n)
    return torch.tensor([float(_t_to_sigma(schedule, t)) for t in timesteps] + [0.0]).to(device)


def _align_your_steps(n: int, sigma_min: float, sigma_max: float, schedule: DiscreteSigmas | None, device: Device,
                      options: ScheduleOptions) -> torch.Tensor:
    """NVIDIA's optimised 10-step sigmas (Sabour et al. 2024), log-linearly interpolated to other step counts;
    the SD 1.5 table unless `options.sdxl`. sigma_min and sigma_max are not used."""
    table = AYS_SDXL_SIGMAS if options.sdxl else AYS_SD1_SIGMAS
    if n == len(table):
        return torch.tensor([*table, 0.0]).to(device)
    # numpy, as AUTOMATIC1111 computes it: linear interpolation of log sigma on evenly spaced points
    known_x = np.linspace(0, 1, len(table))
    log_ascending = np.log(table[::-1])
    interpolated = np.exp(np.interp(np.linspace(0, 1, n), known_x, log_ascending))[::-1]
    return torch.tensor([*interpolated.tolist(), 0.0]).to(device)


def _kl_optimal(n: int, sigma_min: float, sigma_max: float, schedule: DiscreteSigmas | None, device: Device,
                options: ScheduleOptions) -> torch.Tensor:
    """Evenly spaced in arctan(sigma) (Sun et al. 2024); n + 1 values ending at sigma_min, not 0, as in A1111."""
    alpha_min = torch.arctan(torch.tensor(sigma_min, device=device))
    alpha_max = torch.arctan(torch.tensor(sigma_max, device=device))
    step = torch.arange(n + 1, device=device)
    return torch.tan(step / n * alpha_min + (1.0 - step / n) * alpha_max)


def _simple(n: int, sigma_min: float, sigma_max: float, schedule: DiscreteSigmas | None, device: Device,
            options: ScheduleOptions) -> torch.Tensor:
    """Every (T / n)-th of the model's own sigmas from the top, then 0 (ComfyUI's "simple")."""
    sigmas, stride = schedule.sigmas, schedule.sigmas.numel() / n
    return torch.tensor([float(sigmas[-(1 + int(k * stride))]) for k in range(n)] + [0.0]).to(device)


def _ddim(n: int, sigma_min: float, sigma_max: float, schedule: DiscreteSigmas | None, device: Device,
          options: ScheduleOptions) -> torch.Tensor:
    """The model's sigmas at timesteps 1, 1 + T // n, ... below T, descending, then 0: DDIM's uniform spacing. When
    n does not divide T this gives more than n steps (30 -> 31 at T = 1000), as in AUTOMATIC1111."""
    sigmas = schedule.sigmas
    stride = max(sigmas.numel() // n, 1)
    picked = [float(sigmas[t]) for t in range(1, sigmas.numel(), stride)]
    return torch.tensor([*picked[::-1], 0.0]).to(device)


def _beta(n: int, sigma_min: float, sigma_max: float, schedule: DiscreteSigmas | None, device: Device,
          options: ScheduleOptions) -> torch.Tensor:
    """Sigmas linear in the Beta(alpha, beta) quantiles of n evenly spaced points from 1 to 0 ("Beta Sampling is All
    You Need", Lee et al. 2024), then 0."""
    points = 1 - np.linspace(0, 1, n)
    quantiles = [beta_quantile(float(p), options.beta_alpha, options.beta_beta) for p in points]
    return torch.tensor([sigma_min + q * (sigma_max - sigma_min) for q in quantiles] + [0.0]).to(device)


# NVIDIA's Align Your Steps sigmas for 10 steps (research.nvidia.com/labs/toronto-ai/AlignYourSteps/howto.html)
AYS_SD1_SIGMAS = (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029)
AYS_SDXL_SIGMAS = (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029)

SCHEDULE_TYPES: tuple[ScheduleType, ...] = (
    ScheduleType("automatic", "Automatic", None),
    ScheduleType("uniform", "Uniform", _uniform, needs_model=True),
    ScheduleType("karras", "Karras", _karras),
    ScheduleType("exponential", "Exponential", _exponential),
    ScheduleType("polyexponential", "Polyexponential", _polyexponential),
    ScheduleType("sgm_uniform", "SGM Uniform", _sgm_uniform, needs_model=True, aliases=("SGMUniform",)),
    ScheduleType("kl_optimal", "KL Optimal", _kl_optimal),
    ScheduleType("align_your_steps", "Align Your Steps", _align_your_steps),
    ScheduleType("simple", "Simple", _simple, needs_model=True),
    ScheduleType("normal", "Normal", _normal, needs_model=True),
    ScheduleType("ddim", "DDIM", _ddim, needs_model=True),
    ScheduleType("beta", "Beta", _beta, needs_model=True),
)


# --- diffusers' timestep spacings (Lin et al. 2023, "Common Diffusion Noise Schedules and Sample Steps are Flawed",
# table 2), in its numpy arithmetic; sigmas at fractional timesteps are interpolated linearly in sigma, as diffusers'
# Euler schedulers do (k-diffusion interpolates log sigma: the two agree on integer timesteps) ----------------------
def _leading(n: int, sigma_min: float, sigma_max: float, schedule: DiscreteSigmas | None, device: Device,
             options: ScheduleOptions) -> torch.Tensor:
    """Every (T // n)-th timestep from 0, shifted up by `options.steps_offset`: diffusers' "leading"."""
    total = _train_timesteps(schedule, n)
    timesteps = (np.arange(0, n) * (total // n)).round()[::-1] + options.steps_offset
    return _sigmas_at(schedule, timesteps, device)


def _linspace(n: int, sigma_min: float, sigma_max: float, schedule: DiscreteSigmas | None, device: Device,
              options: ScheduleOptions) -> torch.Tensor:
    """n timesteps evenly spaced from T-1 down to 0, fractional between (diffusers' "linspace" of its Euler
    schedulers; k-diffusion's Uniform is the same timesteps with log sigma interpolated)."""
    total = _train_timesteps(schedule, n)
    return _sigmas_at(schedule, np.linspace(0, total - 1, n, dtype=np.float32)[::-1], device)


def _trailing(n: int, sigma_min: float, sigma_max: float, schedule: DiscreteSigmas | None, device: Device,
              options: ScheduleOptions) -> torch.Tensor:
    """n integer timesteps counted back from T-1 in strides of T / n (999, 749, 499, 249 for 4 of 1000): diffusers'
    "trailing", which starts at the last timestep whatever n is."""
    total = _train_timesteps(schedule, n)
    return _sigmas_at(schedule, np.round(np.arange(total, 0, -total / n)) - 1, device)


def _lcm(n: int, sigma_min: float, sigma_max: float, schedule: DiscreteSigmas | None, device: Device,
         options: ScheduleOptions) -> torch.Tensor:
    """diffusers' `LCMScheduler`: n of the 50 timesteps an LCM was distilled on (k - 1, 2k - 1, ..., T - 1 with
    k = T // 50), picked at floor(linspace(0, 50, n, endpoint=False)) from the top (999, 759, 499, 259 for 4)."""
    original = LCM_ORIGINAL_STEPS
    if n > original:
        raise ValueError(f"the LCM schedule picks from the {original} timesteps an LCM was distilled on: use at most "
                         f"{original} steps, got {n}")
    skip = schedule.sigmas.numel() // original
    distilled = (np.arange(1, original + 1) * skip - 1)[::-1]
    return _sigmas_at(schedule, distilled[np.floor(np.linspace(0, original, n, endpoint=False)).astype(np.int64)],
                      device)


def _train_timesteps(schedule: DiscreteSigmas, n: int) -> int:
    """T, the model's number of timesteps; ValueError when a run of n steps would need more (as diffusers refuses)."""
    total = schedule.sigmas.numel()
    if n > total:
        raise ValueError(f"{n} steps are more than the model's {total} timesteps: use fewer steps")
    return total


def _sigmas_at(schedule: DiscreteSigmas, timesteps: np.ndarray, device: Device) -> torch.Tensor:
    """The model's sigmas at (possibly fractional) `timesteps`, linear in sigma between integer ones as numpy's
    `interp` gives them to diffusers, then 0."""
    sigmas = schedule.sigmas.cpu().numpy()
    if not (0 <= timesteps.min() and timesteps.max() <= sigmas.shape[0] - 1):
        raise ValueError(f"timesteps {timesteps.tolist()} leave the model's 0..{sigmas.shape[0] - 1}: use fewer steps")
    picked = np.interp(timesteps.astype(np.float64), np.arange(sigmas.shape[0]), sigmas)
    return torch.tensor([*picked.tolist(), 0.0], dtype=torch.float32).to(device)


LCM_ORIGINAL_STEPS = 50  # the timesteps LCM distillation trains on (diffusers' `original_inference_steps`)

SPACING_TYPES: tuple[ScheduleType, ...] = (
    ScheduleType("leading", "Leading", _leading, needs_model=True),
    ScheduleType("linspace", "Linspace", _linspace, needs_model=True),
    ScheduleType("trailing", "Trailing", _trailing, needs_model=True),
    ScheduleType("lcm", "LCM", _lcm, needs_model=True),
)


# --- k-diffusion's discrete-schedule arithmetic, one value at a time as AUTOMATIC1111 calls it --------------------
def _sigma_to_t(schedule: DiscreteSigmas, sigma: float) -> float:
    """The fractional timestep of `sigma` (k-diffusion's unquantized `sigma_to_t` on a 0-d tensor)."""
    log_sigmas = schedule.log_sigmas
    log_sigma = torch.tensor(sigma).log()
    distances = log_sigma - log_sigmas[:, None]
    low = distances.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=log_sigmas.shape[0] - 2)
    weight = ((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[low + 1])).clamp(0, 1)
    return float((1 - weight) * low + weight * (low + 1))


def _t_to_sigma(schedule: DiscreteSigmas, t: torch.Tensor) -> torch.Tensor:
    """The sigma of fractional timesteps `t` (k-diffusion's `t_to_sigma`: log sigma interpolated linearly)."""
    t = t.float()
    low, high, weight = t.floor().long(), t.ceil().long(), t.frac()
    return ((1 - weight) * schedule.log_sigmas[low] + weight * schedule.log_sigmas[high]).exp()


# --- lookup ---------------------------------------------------------------------------------------------------------
def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


_BY_KEY = {_key(spelling): entry for entry in (*SCHEDULE_TYPES, *SPACING_TYPES)
           for spelling in (entry.name, entry.label, *entry.aliases)}


def schedule_type(name: str) -> ScheduleType:
    """The schedule type called `name` (label, name or alias; case and separators do not matter: "SGM Uniform",
    "sgm_uniform", "sgmuniform"), AUTOMATIC1111's or one of diffusers' spacings; ValueError listing them otherwise."""
    entry = _BY_KEY.get(_key(name))
    if entry is None:
        raise ValueError(f"unknown schedule type {name!r}: choose one of "
                         f"{', '.join(entry.label for entry in (*SCHEDULE_TYPES, *SPACING_TYPES))}")
    return entry


def is_a1111_schedule_type(name: str) -> bool:
    """Whether `name` is one of AUTOMATIC1111's twelve (not one of diffusers' spacings)."""
    return schedule_type(name) in SCHEDULE_TYPES


def available_schedule_types() -> list[str]:
    """AUTOMATIC1111's labels, in its order."""
    return [entry.label for entry in SCHEDULE_TYPES]


def split_sampler_and_schedule(name: str) -> tuple[str, str | None]:
    """A combined sampler name of older infotexts, split: "DPM++ 2M Karras" -> ("DPM++ 2M", "Karras"),
    "euler_a_exponential" -> ("euler_a", "Exponential"), "Euler a" -> ("Euler a", None).

    A name ending in a space, "_" or "-" followed by a schedule type's label, name or alias (any case) is that
    sampler with that schedule type, as AUTOMATIC1111's `get_sampler_and_scheduler` reads it; the longest such ending
    wins ("Euler SGM Uniform" is SGM Uniform, where AUTOMATIC1111 strips only " Uniform").
    """
    words = re.split(r"[\s_-]+", name.strip())
    best: tuple[int, ScheduleType] | None = None
    for entry in SCHEDULE_TYPES[1:]:
        for spelling in (entry.label, entry.name, *entry.aliases):
            tail = [word.lower() for word in re.split(r"[\s_-]+", spelling)]
            matches = len(words) > len(tail) and [word.lower() for word in words[-len(tail):]] == tail
            if matches and (best is None or len(tail) > best[0]):
                best = (len(tail), entry)
    if best is None:
        return name, None
    # cut the original string before the schedule's words, keeping the sampler part's own spelling
    pattern = r"[\s_-]+".join(re.escape(word) for word in words[-best[0]:]) + r"\s*$"
    return re.sub(r"[\s_-]+" + pattern, "", name.strip()), best[1].label


# --- AUTOMATIC1111's samplers -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class A1111Sampler:
    """One sampler of AUTOMATIC1111 (v1.10 `samplers_k_diffusion`, `samplers_timesteps`, `samplers_lcm`): its
    `label`, its k-diffusion function (`function_name`; None for the timestep samplers DDIM, DDIM CFG++, PLMS,
    UniPC, which take no schedule type), other names (`aliases`), the schedule "Automatic" means for it
    (`default_schedule`, None: the model's own, i.e. Uniform) and its options: `discard_next_to_last_sigma` (runs
    steps + 1 sigmas with the next-to-last dropped), `uses_ensd` (records the eta noise seed delta when eta != 0),
    `second_order` (two model calls a step), `brownian_noise` (Brownian-tree SDE noise seeded by the image seeds),
    `solver_type` ("heun" for DPM++ 2M SDE Heun)."""

    label: str
    function_name: str | None
    aliases: tuple[str, ...] = ()
    default_schedule: str | None = None
    discard_next_to_last_sigma: bool = False
    uses_ensd: bool = False
    second_order: bool = False
    brownian_noise: bool = False
    solver_type: str | None = None
    default_eta: float = 1.0

    def records_ensd(self, ensd: int, eta: float | None = None) -> bool:
        """Whether AUTOMATIC1111 writes "ENSD" into the infotext: a nonzero delta, a sampler that `uses_ensd`, and an
        eta (None: the sampler's default) other than 0."""
        eta = self.default_eta if eta is None else eta
        return ensd != 0 and eta != 0 and self.uses_ensd


def _k(label: str, function_name: str, aliases: tuple[str, ...], **options: object) -> A1111Sampler:
    return A1111Sampler(label, function_name, aliases, **options)  # type: ignore[arg-type]


A1111_SAMPLERS: tuple[A1111Sampler, ...] = (
    _k("DPM++ 2M", "sample_dpmpp_2m", ("k_dpmpp_2m",), default_schedule="karras"),
    _k("DPM++ SDE", "sample_dpmpp_sde", ("k_dpmpp_sde",), default_schedule="karras", second_order=True,
       brownian_noise=True),
    _k("DPM++ 2M SDE", "sample_dpmpp_2m_sde", ("k_dpmpp_2m_sde",), default_schedule="exponential",
       brownian_noise=True),
    _k("DPM++ 2M SDE Heun", "sample_dpmpp_2m_sde", ("k_dpmpp_2m_sde_heun",), default_schedule="exponential",
       brownian_noise=True, solver_type="heun"),
    _k("DPM++ 2S a", "sample_dpmpp_2s_ancestral", ("k_dpmpp_2s_a",), default_schedule="karras", uses_ensd=True,
       second_order=True),
    _k("DPM++ 3M SDE", "sample_dpmpp_3m_sde", ("k_dpmpp_3m_sde",), default_schedule="exponential",
       discard_next_to_last_sigma=True, brownian_noise=True),
    _k("Euler a", "sample_euler_ancestral", ("k_euler_a", "k_euler_ancestral"), uses_ensd=True),
    _k("Euler", "sample_euler", ("k_euler",)),
    _k("LMS", "sample_lms", ("k_lms",)),
    _k("Heun", "sample_heun", ("k_heun",), second_order=True),
    _k("DPM2", "sample_dpm_2", ("k_dpm_2",), default_schedule="karras", discard_next_to_last_sigma=True,
       second_order=True),
    _k("DPM2 a", "sample_dpm_2_ancestral", ("k_dpm_2_a",), default_schedule="karras",
       discard_next_to_last_sigma=True, uses_ensd=True, second_order=True),
    _k("DPM fast", "sample_dpm_fast", ("k_dpm_fast",), uses_ensd=True),
    _k("DPM adaptive", "sample_dpm_adaptive", ("k_dpm_ad",), uses_ensd=True),
    _k("Restart", "restart_sampler", ("restart",), default_schedule="karras", second_order=True),
    A1111Sampler("DDIM", None, ("ddim",), default_eta=0.0),
    A1111Sampler("DDIM CFG++", None, ("ddim_cfgpp",), default_eta=0.0),
    A1111Sampler("PLMS", None, ("plms",), default_eta=0.0),
    A1111Sampler("UniPC", None, ("unipc",), default_eta=0.0),
    _k("LCM", "sample_lcm", ("k_lcm",)),
)

_SAMPLERS_BY_KEY = {_key(spelling.replace("+", "p")): entry for entry in A1111_SAMPLERS
                    for spelling in (entry.label, *entry.aliases)}


def a1111_sampler(name: str) -> A1111Sampler:
    """AUTOMATIC1111's sampler called `name` (its label or alias, any case and separators: "DPM++ 2M",
    "dpmpp_2m", "k_dpmpp_2m"); a combined name ("DPM++ 2M Karras") is split first. ValueError if none."""
    sampler_name, _ = split_sampler_and_schedule(name)
    entry = _SAMPLERS_BY_KEY.get(_key(sampler_name.replace("+", "p")))
    if entry is None:
        raise ValueError(f"unknown AUTOMATIC1111 sampler {name!r}: choose one of "
                         f"{', '.join(entry.label for entry in A1111_SAMPLERS)}")
    return entry


def resolve_schedule_type(sampler: str, schedule: str | None = None) -> ScheduleType:
    """The schedule type a run of `sampler` uses when asked for `schedule` (None: "Automatic").

    As in AUTOMATIC1111, a combined sampler name's schedule type ("DPM++ 2M Karras") wins over `schedule`, and
    "Automatic" is the sampler's default; "Automatic" comes back where the sampler has none (the model's own
    sigmas, Uniform's numbers).
    """
    entry = a1111_sampler(sampler)
    _, combined = split_sampler_and_schedule(sampler)
    requested = schedule_type(combined or schedule or "automatic")
    if requested.function is None and entry.default_schedule is not None:
        return schedule_type(entry.default_schedule)
    return requested


def infotext_schedule_type(sampler: str, schedule: str | None = None) -> str:
    """The "Schedule type" AUTOMATIC1111 records for this request: the resolved type's label ("Karras" for an
    automatic DPM++ 2M), or "Automatic" where the model's own sigmas run."""
    return resolve_schedule_type(sampler, schedule).label


def a1111_sigmas(sampler: str, steps: int, schedule: DiscreteSigmas, schedule_type_name: str | None = None, *,
                 options: ScheduleOptions | None = None, sigma_min: float | None = None,
                 sigma_max: float | None = None, discard_penultimate: bool = False) -> torch.Tensor:
    """The float32 CPU sigmas AUTOMATIC1111's k-diffusion samplers run for a `steps`-step txt2img request.

    `sampler` and `schedule_type_name` are AUTOMATIC1111 names (None: "Automatic"); `schedule` is the model's
    discrete schedule (its `NoiseSchedule`); sigma_min / sigma_max default to the model's (A1111's "sigma min/max"
    settings override them); `discard_penultimate` forces what DPM2, DPM2 a and DPM++ 3M SDE always do (A1111's
    "always discard next-to-last sigma"): one more step, its next-to-last sigma dropped.
    """
    entry = a1111_sampler(sampler)
    if entry.function_name is None:
        raise ValueError(f"{entry.label} steps through the model's timesteps and takes no schedule type")
    discard = entry.discard_next_to_last_sigma or discard_penultimate
    n = steps + 1 if discard else steps
    resolved = resolve_schedule_type(sampler, schedule_type_name)
    if resolved.function is None:
        resolved = schedule_type("uniform")  # k-diffusion's model.get_sigmas(n), what "no scheduler" runs
    low = float(schedule.sigmas[0]) if sigma_min is None else sigma_min
    high = float(schedule.sigmas[-1]) if sigma_max is None else sigma_max
    sigmas = resolved(n, low, high, schedule, "cpu", options).cpu()
    return torch.cat([sigmas[:-2], sigmas[-1:]]) if discard else sigmas


# --- the Beta distribution's quantile function, without scipy -----------------------------------------------------
def beta_quantile(p: float, a: float, b: float) -> float:
    """The x with I_x(a, b) = p, I the regularized incomplete beta function: scipy.stats.beta.ppf(p, a, b), to a
    relative 1e-14 (1e-12 for alpha or beta near 0.01, where the quantile itself is that ill-conditioned).

    Newton steps in log x on the continued fraction of Numerical Recipes' `betacf`, kept inside a bracket that
    shrinks by (geometric) bisection where Newton would leave it.
    """
    if not (a > 0 and b > 0):
        raise ValueError(f"the Beta distribution needs alpha > 0 and beta > 0, got {a}, {b}")
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"a quantile needs a probability in [0, 1], got {p}")
    if p in (0.0, 1.0):
        return p
    log_norm = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    low, high = _SMALLEST, 1.0
    if _regularized_incomplete_beta(low, a, b, log_norm) >= p:
        return 0.0  # below the smallest float
    x = a / (a + b)
    for _ in range(400):
        error = _regularized_incomplete_beta(x, a, b, log_norm) - p
        if error == 0:
            return x
        if error > 0:
            high = x
        else:
            low = x
        # dI/d(log x) = x * density; in log x the steep ends of a U-shaped density are nearly linear
        log_slope = log_norm + a * math.log(x) + (b - 1) * math.log1p(-x)
        step = -error * math.exp(-log_slope) if log_slope > -700 else math.inf
        candidate = x * math.exp(step) if abs(step) < 700 else math.nan
        if not low < candidate < high:
            candidate = math.sqrt(low) * math.sqrt(high) if high > 2 * low else (low + high) / 2
        if abs(candidate - x) <= 4e-16 * x or high - low <= 4e-16 * high:
            return candidate
        x = candidate
    return x


_SMALLEST = 5e-324


def _regularized_incomplete_beta(x: float, a: float, b: float, log_norm: float) -> float:
    """I_x(a, b), by the continued fraction on whichever side converges fast (x < (a + 1) / (a + b + 2))."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(log_norm + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1) / (a + b + 2):
        return front * _beta_continued_fraction(x, a, b) / a
    return 1.0 - front * _beta_continued_fraction(1.0 - x, b, a) / b


def _beta_continued_fraction(x: float, a: float, b: float) -> float:
    """The continued fraction of I_x(a, b) (Numerical Recipes, 3rd ed., eq. 6.4.5), by the modified Lentz method."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 1000):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return result
