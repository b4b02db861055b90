"""`Request`: one call of the pipeline (a batch of images sharing their settings), checked when it is made.

A request holds everything that decides its images' pixels apart from the model and its add-ons: prompts, seeds,
sampler, steps, guidance scale, eta and size. It is frozen; `replace` and `subset` make changed copies.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from ldm.models.diffusion import samplers
from ldm.models.diffusion.noise import RNG_SOURCES
from ldm.models.diffusion.schedule_types import schedule_type, split_sampler_and_schedule
from ldm.pipeline.errors import UsageError
from ldm.pipeline.metadata import parse_parameters_text

MAX_SEED = 2**32 - 1  # numpy's RandomState and other tools take 32-bit seeds; staying inside keeps seeds portable
MAX_STEPS = 1000  # the models' number of training timesteps
MAX_SIDE = 16384  # pixels: far past what any model makes well; larger sizes only exhaust memory, even tiled
MAX_SCALE = 100.0  # |scale|: ComfyUI's limit too; far past it, guidance overflows to NaN
SIZE_MULTIPLE = 8  # the latents are 1/8 of the image for every released autoencoder


def nearest_multiples(value: int, multiple: int) -> str:
    """"32 or 48": the multiples of `multiple` around `value` (only the upper one below the first)."""
    lower = value // multiple * multiple
    return f"{lower} or {lower + multiple}" if lower > 0 else str(multiple)


def check_seed(seed: int, where: str, last_offset: int = 0) -> None:
    """`seed` and `seed + last_offset` (a run's last image) must be valid seeds."""
    if seed < 0 or seed > MAX_SEED:
        raise UsageError(f"{where}: seed {seed} is out of range: seeds must lie in 0..{MAX_SEED}")
    if seed + last_offset > MAX_SEED:
        raise UsageError(f"{where}: seed {seed} gives a later image the seed {seed + last_offset}, out of range: "
                         f"seeds must lie in 0..{MAX_SEED} (image i of a run uses seed + i); use a smaller seed")


def resolve_sampler(name: str, where: str = "--sampler") -> str:
    """The registered sampler for `name`, accepting the spellings users know ("Euler a", "DPM++ 2M Karras")."""
    try:
        return samplers.resolve_sampler(name).name
    except ValueError:
        raise UsageError(f"{where}: unknown sampler {name!r}; available: "
                         f"{', '.join(samplers.available_samplers())}") from None


def sampler_eta(sampler: str, eta: float | None, explicit: bool, where: str) -> float | None:
    """The eta to pass: DDIM takes --ddim_eta (CompVis); other stochastic samplers keep their own default (1) unless
    an eta other than 0 is given; deterministic samplers refuse one."""
    if sampler == "ddim":
        return 0.0 if eta is None else eta
    if eta is None or (eta == 0 and not explicit):
        return None
    if not samplers.resolve_sampler(sampler).stochastic:
        hint = "use --ddim_eta 0 or --sampler ddim" if sampler == "plms" else "use an ancestral/SDE sampler or ddim"
        raise UsageError(f"{where}: {sampler} is deterministic and takes no eta (got {eta}): {hint}")
    return eta


def a1111_sampler_and_schedule(name: str, schedule: str | None = None) -> tuple[str, str | None]:
    """The sampler and schedule type an AUTOMATIC1111 infotext's `Sampler` (and `Schedule type`) stand for:
    "DPM++ 2M Karras" is DPM++ 2M with Karras, a plain k-diffusion name takes "Automatic" (its sampler's
    default); CompVis samplers keep their name and take none."""
    try:
        spec = samplers.resolve_sampler(name)
    except ValueError:
        return name, schedule  # the request reports the unknown name in its words
    if not isinstance(spec, samplers.KSamplerSpec):
        return name, None
    sampler, combined = split_sampler_and_schedule(name)
    return sampler, combined or schedule or "Automatic"


def check_scheduler(sampler: str, scheduler: str, where: str) -> str:
    """The schedule type's label; UsageError for an unknown one, or one a CompVis sampler (ddim, plms, dpm_solver:
    they step through the model's own timesteps) cannot take."""
    try:
        label = schedule_type(scheduler).label
    except ValueError as error:
        raise UsageError(f"{where}: {error}") from None
    if label != "Automatic" and not isinstance(samplers.resolve_sampler(sampler), samplers.KSamplerSpec) \
            and samplers.compvis_spacing(sampler, label) is None:
        takes = " (it takes Leading or Trailing)" if samplers.compvis_spacing(sampler, None) else ""
        raise UsageError(f"{where}: {sampler} steps through the model's own timesteps and takes no schedule type "
                         f"{label}{takes}: use a k-diffusion sampler such as euler or dpmpp_2m, or leave it out")
    return label


def check_image_settings(settings: dict[str, Any], where: str, f: int = SIZE_MULTIPLE) -> None:
    """Steps, size, scale and eta of one prompt's settings (keys steps, H, W, scale, eta)."""
    steps = settings["steps"]
    if not 1 <= steps <= MAX_STEPS:
        raise UsageError(f"{where}: steps {steps} is out of range: use 1..{MAX_STEPS}")
    for name in ("H", "W"):
        value = settings[name]
        multiple = math.lcm(8, f)
        if value <= 0 or value % multiple:
            raise UsageError(f"{where}: {name} {value} is not a positive multiple of {multiple}: "
                             f"try {nearest_multiples(value, multiple)}")
        if value > MAX_SIDE:
            raise UsageError(f"{where}: {name} {value} is too large: sides are at most {MAX_SIDE} pixels")
    if not math.isfinite(settings["scale"]):
        raise UsageError(f"{where}: scale {settings['scale']} is not a finite number")
    if abs(settings["scale"]) > MAX_SCALE:
        raise UsageError(f"{where}: scale {settings['scale']:g} is too large: guidance scales lie in "
                         f"-{MAX_SCALE:g}..{MAX_SCALE:g} (usually 1 to 15; 7.5 is the default)")
    eta = settings["eta"]
    if eta is not None and (not math.isfinite(eta) or eta < 0):
        raise UsageError(f"{where}: eta {eta} must be a number >= 0")


def _texts(value: str | Sequence[str], count: int, name: str) -> tuple[str, ...]:
    texts = (value,) * count if isinstance(value, str) else tuple(value)
    if len(texts) != count or not all(isinstance(text, str) for text in texts):
        raise UsageError(f"{name}: expected one text or {count} texts (one per seed), got {value!r}")
    return texts


@dataclass(frozen=True)
class Request:
    """One batch: image i has prompts[i], negative_prompts[i] and seeds[i]; the rest is shared.

    From code: `Request("a cat", seed=7, batch_size=4)` (seeds 7..10), or `Request(["a cat", "a dog"],
    seeds=[1, 2])`. `height`/`width` None take the model's own size. `eta` None keeps the sampler's default (0 for
    DDIM, 1 for ancestral and SDE samplers). `clip_skip` is AUTOMATIC1111's (2: the text encoder's penultimate
    layer, for SD 1.x; SD 2.x and SDXL ignore it as there); `clip_skip_sdxl` is A1111's "Clip skip SDXL" option:
    SDXL's CLIP ViT-L then reads hidden layer -clip_skip, without the final norm (1: the last layer). `scheduler` is
    an AUTOMATIC1111 schedule type ("Karras", "Exponential", "SGM Uniform", "Align Your Steps", ...; None: this
    tool's sampler defaults) or one of diffusers' spacings ("Trailing", ...): with one, the sigmas are
    AUTOMATIC1111's for the sampler, its "Automatic" defaults and dropped sigmas included. The noise options are
    AUTOMATIC1111's: `rng` ("cpu", "gpu" = torch on CUDA, "nv" = CUDA's generator emulated anywhere), `ensd` (eta
    noise seed delta), variation seeds (`subseeds`, one per image, and `subseed_strength`), `seed_resize_from`
    ((width, height) the seeds' noise was made at).
    Checked on creation; `where` names the source in messages.
    """

    prompt: str | Sequence[str]
    negative_prompt: str | Sequence[str] = ""
    seed: int = 42
    batch_size: int = 1
    seeds: Sequence[int] | None = None
    steps: int = 50
    sampler: str = "ddim"
    scale: float = 7.5
    eta: float | None = None
    height: int | None = None
    width: int | None = None
    prompt_weighting: bool = False
    clip_skip: int = 1
    clip_skip_sdxl: bool = False
    scheduler: str | None = None
    rng: str = "cpu"
    ensd: int = 0
    subseeds: Sequence[int] | None = None
    subseed_strength: float = 0.0
    seed_resize_from: tuple[int, int] | None = None
    where: str = field(default="request", compare=False)  # names the request's source in messages

    def __post_init__(self) -> None:
        seeds = tuple(int(seed) for seed in self.seeds) if self.seeds is not None else \
            tuple(self.seed + offset for offset in range(self.batch_size))
        if not seeds:
            raise UsageError(f"{self.where}: a request needs at least one image (batch_size >= 1)")
        for seed in seeds:
            check_seed(seed, self.where)
        set_field = object.__setattr__  # frozen: the normalised values are set once, here
        set_field(self, "seeds", seeds)
        set_field(self, "seed", seeds[0])
        set_field(self, "batch_size", len(seeds))
        set_field(self, "prompt", _texts(self.prompt, len(seeds), "prompt"))
        set_field(self, "negative_prompt", _texts(self.negative_prompt, len(seeds), "negative_prompt"))
        sampler = resolve_sampler(self.sampler, self.where)
        set_field(self, "sampler", sampler)
        set_field(self, "scale", float(self.scale))
        eta = None if self.eta is None else float(self.eta)
        if eta == 0 and sampler != "ddim" and not samplers.resolve_sampler(sampler).stochastic:
            eta = None  # no noise to scale: the same as the sampler's default
        set_field(self, "eta", sampler_eta(sampler, eta, True, self.where))
        if isinstance(self.clip_skip, bool) or not isinstance(self.clip_skip, int) or not 1 <= self.clip_skip <= 12:
            raise UsageError(f"{self.where}: clip_skip {self.clip_skip!r} must be a whole number from 1 (the last "
                             f"layer, the default) to 12")
        if self.scheduler is not None:
            set_field(self, "scheduler", check_scheduler(sampler, self.scheduler, self.where))
        set_field(self, "rng", self.rng.lower())
        if self.rng not in RNG_SOURCES:
            raise UsageError(f"{self.where}: rng {self.rng!r} is not one of {', '.join(RNG_SOURCES)}")
        if not 0.0 <= self.subseed_strength <= 1.0:  # also refuses NaN
            raise UsageError(f"{self.where}: subseed_strength {self.subseed_strength} is outside [0, 1]")
        if self.subseeds is not None:
            subseeds = tuple(int(seed) for seed in self.subseeds)
            if len(subseeds) != len(seeds):
                raise UsageError(f"{self.where}: {len(subseeds)} subseeds for {len(seeds)} images")
            for seed in subseeds:
                check_seed(seed, self.where)
            set_field(self, "subseeds", subseeds)
        elif self.subseed_strength > 0:
            raise UsageError(f"{self.where}: a subseed_strength above 0 needs subseeds (the variation seeds)")
        if self.height is not None and self.width is not None:
            check_image_settings({"steps": self.steps, "H": self.height, "W": self.width, "scale": self.scale,
                                  "eta": self.eta}, self.where)
        elif not 1 <= self.steps <= MAX_STEPS:
            raise UsageError(f"{self.where}: steps {self.steps} is out of range: use 1..{MAX_STEPS}")

    @property
    def prompts(self) -> tuple[str, ...]:
        return self.prompt  # type: ignore[return-value]  # normalised to a tuple in __post_init__

    @property
    def negative_prompts(self) -> tuple[str, ...]:
        return self.negative_prompt  # type: ignore[return-value]

    @property
    def size(self) -> tuple[int, int]:
        """(height, width); only for a request the pipeline has completed with the model's size."""
        if self.height is None or self.width is None:
            raise ValueError("the request has no size yet: the pipeline fills in the model's own")
        return self.height, self.width

    @classmethod
    def from_infotext(cls, text: str, where: str = "infotext") -> "Request":
        """The request an image's "parameters" text (AUTOMATIC1111's infotext, as this tool writes it) describes:
        prompt, negative prompt, seed, steps, sampler, CFG scale, size, eta and prompt weighting."""
        try:
            fields = parse_parameters_text(text)
        except ValueError as error:
            raise UsageError(f"{where}: {error}") from None
        values = {"prompt": fields["prompt"], "negative_prompt": fields["negative_prompt"],
                  "prompt_weighting": bool(fields.get("prompt_weighting", False)), "where": where}
        names = {"seed": "seed", "steps": "steps", "sampler": "sampler", "scale": "scale", "eta": "eta", "H": "height",
                 "W": "width"}
        values.update((name, fields[key]) for key, name in names.items() if key in fields)
        return cls(**values)

    def replace(self, **changes: Any) -> "Request":
        """A checked copy with `changes` (seeds, prompts and negative prompts keep their per-image values)."""
        values = {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}
        values.update(changes)
        if "seed" in changes and "seeds" not in changes:
            values["seeds"] = None
        return Request(**values)

    def subset(self, indices: Sequence[int]) -> "Request":
        """The images at `indices`, with their own prompts and seeds (used to split a batch that does not fit)."""
        subseeds = None if self.subseeds is None else [self.subseeds[i] for i in indices]
        return self.replace(prompt=[self.prompts[i] for i in indices],
                            negative_prompt=[self.negative_prompts[i] for i in indices],
                            seeds=[self.seeds[i] for i in indices], subseeds=subseeds)
