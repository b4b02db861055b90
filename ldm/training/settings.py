"""The `training:` section of a training config: what the inference `model:` section does not say.

CompVis keeps training switches inside `model.params` (`cond_stage_trainable`, `use_ema`, ...); this package reads
`cond_stage_trainable` and `parameterization` from there, but `use_ema` keeps its inference meaning (the checkpoint's
`model_ema.*` weights are the ones to use), so the EMA of a training run is switched here, by `ema_decay`.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

LR_SCHEDULES = ("constant", "cosine")
EXPORT_DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class LoraSettings:
    """LoRA adapters (Hu et al. 2021) on the attention layers, saved with kohya-style key names."""

    rank: int = 4
    alpha: float | None = None  # kohya's scale numerator: the update is up @ down * alpha / rank; None means rank
    unet: bool = True
    text_encoder: bool = False

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"training.lora.rank must be at least 1, got {self.rank}")
        if not (self.unet or self.text_encoder):
            raise ValueError("training.lora trains nothing: set unet and/or text_encoder to true")


@dataclass(frozen=True)
class TrainingSettings:
    """Everything a run needs beyond the model, the data and the Lightning trainer; see `from_config`."""

    ucg_rate: float = 0.1  # probability of training on the empty caption, for classifier-free guidance
    snr_gamma: float | None = None  # Min-SNR-gamma loss weighting (Hang et al. 2023; 5 is their choice); None: off
    ema_decay: float | None = None  # EMA of the trained weights (CompVis LitEma); None: no EMA
    weight_decay: float = 0.0
    lr_schedule: str = "constant"
    lr_warmup_steps: int = 0
    lr_min_ratio: float = 0.0  # the cosine schedule ends at this fraction of the learning rate
    init_from: str | None = None  # a full checkpoint whose weights the run starts from (fine-tuning)
    init_from_ema: bool = False  # take init_from's model_ema.* weights
    cache_latents: bool = False  # keep each data item's autoencoder posterior: only for deterministic data sets
    lora: LoraSettings | None = None
    export_ema: bool = True  # the exported .safetensors holds the EMA weights (when there is an EMA)
    export_dtype: str = "float32"
    checkpoint_every_n_steps: int = 500
    sample_every_n_steps: int = 0  # 0: never; else a grid of `sample_prompts` goes to <logdir>/images
    sample_prompts: tuple[str, ...] = ()
    sample_steps: int = 20
    sample_scale: float = 5.0
    sample_sampler: str = "ddim"

    def __post_init__(self) -> None:
        if not 0.0 <= self.ucg_rate < 1.0:
            raise ValueError(f"training.ucg_rate {self.ucg_rate} must lie in [0, 1)")
        if self.snr_gamma is not None and self.snr_gamma <= 0:
            raise ValueError(f"training.snr_gamma {self.snr_gamma} must be > 0, or null for plain MSE")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"training.ema_decay {self.ema_decay} must lie in (0, 1), or be null for no EMA")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"training.lr_schedule {self.lr_schedule!r} is not one of {LR_SCHEDULES}")
        if self.export_dtype not in EXPORT_DTYPES:
            raise ValueError(f"training.export_dtype {self.export_dtype!r} is not one of {EXPORT_DTYPES}")
        if self.lora is not None and self.ema_decay is not None:
            raise ValueError("training.ema_decay is not supported with training.lora: set ema_decay to null")
        for name in ("lr_warmup_steps", "checkpoint_every_n_steps", "sample_every_n_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"training.{name} must be >= 0, got {getattr(self, name)}")

    @classmethod
    def from_config(cls, section: Mapping[str, Any] | None) -> "TrainingSettings":
        """Settings from the yaml `training:` mapping; unknown keys are an error that lists the known ones."""
        values = dict(section or {})
        known = {item.name for item in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown training settings {unknown}: known ones are {sorted(known)}")
        if values.get("lora") is not None:
            lora = dict(values["lora"])
            lora_known = {item.name for item in fields(LoraSettings)}
            if set(lora) - lora_known:
                raise ValueError(f"unknown training.lora settings {sorted(set(lora) - lora_known)}: known ones are "
                                 f"{sorted(lora_known)}")
            values["lora"] = LoraSettings(**lora)
        if "sample_prompts" in values:
            values["sample_prompts"] = tuple(values["sample_prompts"] or ())
        return cls(**values)
