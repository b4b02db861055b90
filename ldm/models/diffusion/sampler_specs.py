"""The entries of the sampler registry (samplers.py): what one sampler is and how it runs.

A `SamplerSpec` knows its names and AUTOMATIC1111's facts about it and runs itself from unit noise (`sample`) or from
clean latents (`sample_img2img`): a `KSamplerSpec` is a k-diffusion style function over a sigma schedule, a
`CompVisSamplerSpec` a CompVis sampler class, a `DDIMCFGPPSpec` AUTOMATIC1111's DDIM CFG++.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from ldm.models.diffusion import k_sampling
from ldm.models.diffusion.brownian import BrownianTreeNoiseSampler, NoiseSampler, RandnSource
from ldm.models.diffusion.k_denoisers import CompVisDenoiser, make_denoiser
from ldm.models.diffusion.noise import ImageNoise

if TYPE_CHECKING:
    from ldm.models.diffusion.inpainting import KnownLatents

SCHEDULES = ("model", "discrete", "karras")
CFG_PP_DDIM_SCALE = 1 / 12.5  # AUTOMATIC1111's DDIM CFG++ maps guidance scales 0..12.5 onto CFG++'s 0..1

Callback = Callable[[dict[str, Any]], None]


@dataclass(frozen=True, kw_only=True)
class SamplerSpec:
    """One registered sampler: its canonical `name`, the `display_name` AUTOMATIC1111 prints, the other spellings
    it answers to (`aliases`), whether it takes an eta (`stochastic`; LCM and Restart draw noise but take none), and
    AUTOMATIC1111's facts about it (see the module docstring; `automatic_schedule` "karras", "exponential" or None
    for the model's own)."""

    name: str
    display_name: str
    aliases: tuple[str, ...] = ()
    stochastic: bool = False
    uses_ensd: bool = False
    brownian_noise: bool = False
    discard_next_to_last_sigma: bool = False
    automatic_schedule: str | None = None

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
            raise ValueError(f"sampler {self.name!r} takes no eta (got eta={eta}); use an ancestral or SDE "
                             "sampler, or ddim, for eta > 0")

    def sample(self, model: Any, steps: int, x_T: torch.Tensor, cond: Any, uncond: Any, scale: float,
               noise: ImageNoise, eta: float | None = None, callback: Callback | None = None,
               disable: bool | None = None, known: KnownLatents | None = None,
               **options: Any) -> torch.Tensor:
        """Latents shaped like the unit starting noise `x_T`, as the module-level `sample` describes (the known
        latents are not pasted into the result here); `options` are its k-diffusion keywords."""
        raise NotImplementedError

    def sample_img2img(self, model: Any, steps: int, x_init: torch.Tensor, t_enc: int, cond: Any, uncond: Any,
                       scale: float, noise: ImageNoise, eta: float | None = None, disable: bool | None = None,
                       start_noise: torch.Tensor | None = None, known: KnownLatents | None = None,
                       **options: Any) -> torch.Tensor:
        """Latents from clean latents `x_init` over the last `t_enc` of `steps` steps, as the module-level
        `sample_img2img` describes (the known latents are not pasted into the result here)."""
        raise ValueError(f"sampler {self.name!r} cannot start from an image: use ddim or a k-diffusion sampler "
                         f"(euler, euler_a, dpmpp_2m, dpmpp_2m_karras, unipc, ...)")


@dataclass(frozen=True, kw_only=True)
class KSamplerSpec(SamplerSpec):
    """A k-diffusion style `function(denoiser, x, sigmas, extra_args, callback, disable, **knobs)` on a sigma
    `schedule`: "model" (the denoiser's get_sigmas), "discrete" (diffusers' linspace) or "karras".

    `knobs` are fixed keyword arguments (DPM++ 2M SDE Heun's solver_type, the eta AUTOMATIC1111 runs DPM fast and
    adaptive with); an eta given to `run` replaces theirs. `denoiser` builds the model's denoiser (`make_denoiser`,
    or LCM's own). `takes_sigma_range`: the function takes (sigma_min, sigma_max[, n]) instead of sigmas (DPM fast
    and adaptive). `hand_off`: it can stop and resume mid-schedule; `karras_variant`: it gets a "_karras" twin.
    """

    function: Callable[..., torch.Tensor]
    schedule: str = "model"
    knobs: tuple[tuple[str, Any], ...] = ()
    denoiser: Callable[..., CompVisDenoiser] = make_denoiser
    takes_sigma_range: bool = False
    hand_off: bool = True
    karras_variant: bool = True

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule {self.schedule!r} of sampler {self.name!r} is not one of {SCHEDULES}")

    @property
    def can_start_from_image(self) -> bool:
        return True

    @property
    def can_hand_off(self) -> bool:
        return self.hand_off

    def sigmas(self, denoiser: CompVisDenoiser, steps: int, discard_next_to_last_sigma: bool = False) -> torch.Tensor:
        """The `steps + 1` decreasing noise levels of a `steps`-step run, ending at 0. With
        `discard_next_to_last_sigma`, AUTOMATIC1111's rule: the schedule of steps + 1 without its next-to-last
        level."""
        if discard_next_to_last_sigma:
            sigmas = self.sigmas(denoiser, steps + 1)
            return torch.cat([sigmas[:-2], sigmas[-1:]])
        if self.schedule == "karras":
            return denoiser.schedule.get_sigmas_karras(steps)
        if self.schedule == "discrete":
            return denoiser.get_sigmas_discrete(steps)
        return denoiser.get_sigmas(steps)

    def noise_sampler(self, x: torch.Tensor, sigmas: torch.Tensor, noise: ImageNoise,
                      tree_seeds: Sequence[int] | None = None, tree_randn: RandnSource | None = None) -> NoiseSampler:
        """The noise of a run over `sigmas` (a whole schedule): for the Brownian-noise samplers one Brownian tree
        per image over the schedule's positive range, seeded with `tree_seeds` (default: `noise.brownian_seeds()`,
        the image seeds AUTOMATIC1111 seeds its trees with) and drawing from `tree_randn` (default: `noise`'s random
        source, `noise.seeded_randn`; torchsde's own CPU draws, the same numbers, for the CPU source); for the others
        each image's own stream of `noise`."""
        if not self.brownian_noise:
            return noise.noise_sampler(x)
        seeds = [int(seed) for seed in (noise.brownian_seeds() if tree_seeds is None else tree_seeds)]
        if tree_randn is None and noise.rng != "cpu":
            tree_randn = noise.seeded_randn
        return BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(), seed=seeds, randn=tree_randn)

    def run(self, denoiser: Any, x: torch.Tensor, sigmas: torch.Tensor, cond: Any, uncond: Any, scale: float,
            noise: ImageNoise, eta: float | None = None, callback: Callback | None = None,
            disable: bool | None = None, noise_sampler: NoiseSampler | None = None,
            sigma_range: tuple[Any, Any] | None = None) -> torch.Tensor:
        """The sampler from `x` (at noise level sigmas[0]) down `sigmas`, guided with `scale` between `cond` and
        `uncond`; `eta` None keeps the entry's default. Its noise comes from `noise_sampler`, default
        `self.noise_sampler(x, sigmas, noise)` (a run that is one part of a longer schedule passes the whole
        schedule's). DPM fast / adaptive run from sigma_range = (sigma_min, sigma_max), default (the last positive
        sigma, sigmas[0]), with n = len(sigmas) - 1 evaluations for DPM fast."""
        knobs: dict[str, Any] = dict(self.knobs)
        knobs["noise_sampler"] = self.noise_sampler(x, sigmas, noise) if noise_sampler is None else noise_sampler
        if eta is not None and self.stochastic:
            knobs["eta"] = eta
        extra_args = {"cond": cond, "uncond": uncond, "cond_scale": scale}
        if not self.takes_sigma_range:
            return self.function(denoiser, x, sigmas, extra_args=extra_args, callback=callback, disable=disable,
                                 **knobs)
        sigma_min, sigma_max = sigma_range or (sigmas[sigmas > 0][-1], sigmas[0])
        if "n" in inspect.signature(self.function).parameters:
            knobs["n"] = len(sigmas) - 1
        return self.function(denoiser, x, sigma_min, sigma_max, extra_args=extra_args, callback=callback,
                             disable=disable, **knobs)

    def sample(self, model: Any, steps: int, x_T: torch.Tensor, cond: Any, uncond: Any, scale: float,
               noise: ImageNoise, eta: float | None = None, callback: Callback | None = None,
               disable: bool | None = None, known: KnownLatents | None = None, quantize: bool = False,
               sigmas: torch.Tensor | None = None, discard_next_to_last_sigma: bool = False,
               tree_seeds: Sequence[int] | None = None, tree_randn: RandnSource | None = None) -> torch.Tensor:
        denoiser = self.denoiser(model, quantize=quantize)
        if sigmas is None:
            sigmas = self.sigmas(denoiser, steps, discard_next_to_last_sigma)
        sigmas = sigmas.to(x_T.device)
        x = x_T * sigmas[0]
        # DPM fast / adaptive span the model's whole range whatever the schedule, as AUTOMATIC1111 runs them
        sigma_range = (denoiser.sigma_min.item(), denoiser.sigma_max.item()) if self.takes_sigma_range else None
        return self.run(_around_denoiser(denoiser, known), x, sigmas, cond, uncond, scale, noise, eta, callback,
                        disable, self.noise_sampler(x, sigmas, noise, tree_seeds, tree_randn), sigma_range)

    def sample_img2img(self, model: Any, steps: int, x_init: torch.Tensor, t_enc: int, cond: Any, uncond: Any,
                       scale: float, noise: ImageNoise, eta: float | None = None, disable: bool | None = None,
                       start_noise: torch.Tensor | None = None, known: KnownLatents | None = None,
                       quantize: bool = False, sigmas: torch.Tensor | None = None,
                       discard_next_to_last_sigma: bool = False, tree_seeds: Sequence[int] | None = None,
                       tree_randn: RandnSource | None = None) -> torch.Tensor:
        denoiser = self.denoiser(model, quantize=quantize)
        if sigmas is None:
            sigmas = self.sigmas(denoiser, steps, discard_next_to_last_sigma)
        all_sigmas = sigmas.to(x_init.device)
        sigmas = all_sigmas[len(all_sigmas) - 1 - t_enc:]
        x = x_init + (noise.randn_like(x_init) if start_noise is None else start_noise) * sigmas[0]
        if t_enc == 0:
            return x
        # the Brownian tree spans the whole schedule, as AUTOMATIC1111 builds it for img2img too
        noise_sampler = self.noise_sampler(x, all_sigmas, noise, tree_seeds, tree_randn)
        return self.run(_around_denoiser(denoiser, known), x, sigmas, cond, uncond, scale, noise, eta, None, disable,
                        noise_sampler)


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

    @property
    def takes_ddim_discretize(self) -> bool:
        """Whether its timesteps can be spaced otherwise than CompVis' uniform spacing (DDIM, PLMS: "trailing")."""
        return "ddim_discretize" in inspect.signature(self.sampler_class.sample).parameters

    def sample(self, model: Any, steps: int, x_T: torch.Tensor, cond: Any, uncond: Any, scale: float,
               noise: ImageNoise, eta: float | None = None, callback: Callback | None = None,
               disable: bool | None = None, known: KnownLatents | None = None, ddim_discretize: str = "uniform",
               **options: Any) -> torch.Tensor:
        _refuse_sigmas(self, options)
        spacing = {"ddim_discretize": ddim_discretize} if ddim_discretize != "uniform" else {}
        sampler = self.sampler_class(_around_model(model, known))
        img_callback = None
        if callback is not None:
            def img_callback(pred_x0: torch.Tensor, i: int) -> None:
                callback({"i": i, "denoised": pred_x0})
        samples, _ = sampler.sample(S=steps, batch_size=x_T.shape[0], shape=x_T.shape[1:], conditioning=cond,
                                    eta=0.0 if eta is None else eta, x_T=x_T, noise=noise, verbose=not disable,
                                    unconditional_guidance_scale=scale, unconditional_conditioning=uncond,
                                    img_callback=img_callback, **spacing)
        return samples

    def sample_img2img(self, model: Any, steps: int, x_init: torch.Tensor, t_enc: int, cond: Any, uncond: Any,
                       scale: float, noise: ImageNoise, eta: float | None = None, disable: bool | None = None,
                       start_noise: torch.Tensor | None = None, known: KnownLatents | None = None,
                       **options: Any) -> torch.Tensor:
        _refuse_sigmas(self, options)
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


@dataclass(frozen=True, kw_only=True)
class DDIMCFGPPSpec(SamplerSpec):
    """AUTOMATIC1111's "DDIM CFG++": DDIM with CFG++ (Chung et al. 2024) on its own timesteps, range(0, T, T // steps)
    + 1, of which the lowest (1) is only stepped to, and the guidance scale times 1 / 12.5. Run here as
    `sample_euler_ancestral_cfg_pp` on those timesteps' noise levels, which is the same update in the k-diffusion
    variable: x starts at the unit noise times sqrt(sigma^2 + 1) and the result is scaled back by
    1 / sqrt(sigma^2 + 1) at timestep 1, where AUTOMATIC1111's run ends. eta is DDIM's (default 0)."""

    @property
    def can_start_from_image(self) -> bool:
        return True

    @staticmethod
    def timesteps(num_timesteps: int, steps: int) -> list[int]:
        """AUTOMATIC1111's DDIM timesteps, ascending."""
        if not 1 <= steps <= num_timesteps:
            raise ValueError(f"DDIM CFG++ takes 1..{num_timesteps} steps, got {steps}")
        return [min(step + 1, num_timesteps - 1) for step in range(0, num_timesteps, num_timesteps // steps)]

    def _run(self, denoiser: CompVisDenoiser, x_vp: torch.Tensor, sigmas: torch.Tensor, cond: Any, uncond: Any,
             scale: float, noise: ImageNoise, eta: float | None, callback: Callback | None, disable: bool | None,
             known: KnownLatents | None) -> torch.Tensor:
        x = x_vp * (sigmas[0] ** 2 + 1) ** 0.5
        extra_args = {"cond": cond, "uncond": uncond, "cond_scale": scale * CFG_PP_DDIM_SCALE}
        x = k_sampling.sample_euler_ancestral_cfg_pp(_around_denoiser(denoiser, known), x, sigmas,
                                                     extra_args=extra_args, callback=callback, disable=disable,
                                                     eta=0.0 if eta is None else eta,
                                                     noise_sampler=noise.noise_sampler(x))
        return x / (sigmas[-1] ** 2 + 1) ** 0.5

    def _sigmas(self, denoiser: CompVisDenoiser, timesteps: list[int], device: torch.device) -> torch.Tensor:
        return denoiser.sigmas[torch.tensor(timesteps[::-1], device=denoiser.sigmas.device)].to(device)

    def sample(self, model: Any, steps: int, x_T: torch.Tensor, cond: Any, uncond: Any, scale: float,
               noise: ImageNoise, eta: float | None = None, callback: Callback | None = None,
               disable: bool | None = None, known: KnownLatents | None = None, **options: Any) -> torch.Tensor:
        _refuse_sigmas(self, options)
        denoiser = make_denoiser(model)
        sigmas = self._sigmas(denoiser, self.timesteps(model.num_timesteps, steps), x_T.device)
        return self._run(denoiser, x_T, sigmas, cond, uncond, scale, noise, eta, callback, disable, known)

    def sample_img2img(self, model: Any, steps: int, x_init: torch.Tensor, t_enc: int, cond: Any, uncond: Any,
                       scale: float, noise: ImageNoise, eta: float | None = None, disable: bool | None = None,
                       start_noise: torch.Tensor | None = None, known: KnownLatents | None = None,
                       **options: Any) -> torch.Tensor:
        """As AUTOMATIC1111: noised to timestep t_enc of the run's list (at most its last), then denoised from the
        step below it."""
        _refuse_sigmas(self, options)
        denoiser = make_denoiser(model)
        timesteps = self.timesteps(model.num_timesteps, steps)
        t_enc = min(t_enc, len(timesteps) - 1)
        if t_enc == 0:
            return x_init
        alpha = model.alphas_cumprod[timesteps[t_enc]].to(x_init)
        start_noise = noise.randn_like(x_init) if start_noise is None else start_noise
        x_vp = x_init * alpha.sqrt() + start_noise * (1 - alpha).sqrt()
        sigmas = self._sigmas(denoiser, timesteps[:t_enc], x_init.device)
        return self._run(denoiser, x_vp, sigmas, cond, uncond, scale, noise, eta, None, disable, known)


def _refuse_sigmas(spec: SamplerSpec, options: dict[str, Any]) -> None:
    if options.get("sigmas") is not None:
        raise ValueError(f"sampler {spec.name!r} runs on its own timesteps and takes no sigma schedule")


def _around_model(model: Any, known: KnownLatents | None) -> Any:
    return model if known is None else known.around_model(model)


def _around_denoiser(denoiser: CompVisDenoiser, known: KnownLatents | None) -> Any:
    return denoiser if known is None else known.around_denoiser(denoiser)
