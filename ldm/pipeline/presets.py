"""Few-step models recognised from what their files say, and the settings their authors give for them.

    preset = few_step_preset("sd_xl_base_1.0.safetensors", loras=["sdxl_lightning_4step_lora.safetensors"])
    request = Request("a fox", seed=1, **preset.request_fields())   # euler, Trailing, 4 steps, scale 1

A distilled model runs well only with the steps, guidance and timesteps it was distilled for (SDXL-Lightning: Euler
on trailing timesteps, no guidance, as many steps as its file name says). `few_step_preset` reads the checkpoint's
and the LoRAs' file names (or, for generic names such as `pytorch_lora_weights.safetensors`, their folders'), the
titles in a safetensors file's metadata, and a diffusers folder's scheduler config, and returns those settings as a
`Preset`; nothing changes unless a caller applies them (the scripts do, for the flags not given). Request's own
defaults stay as they are.

Guidance scale 1 here is the authors' "guidance_scale=0" in diffusers: their pipelines skip guidance at any scale
up to 1, and a scale of 1 here runs the conditional prediction alone too (scale 0 would be the unconditional one).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from ldm.lora import safetensors_metadata

GENERIC_NAMES = re.compile(r"^(pytorch_lora_weights|diffusion_pytorch_model|model)(\.fp16)?$")
METADATA_TITLES = ("modelspec.title", "ss_output_name")  # the safetensors metadata that names what a file is
TITLE_LENGTH = 200  # a title's characters looked at: enough for any model name, bounded for a crafted header
FOLDER_LEVELS = 3  # a generic name's folders: .../models--org--repo/snapshots/<hash>/pytorch_lora_weights.safetensors


@dataclass(frozen=True)
class Preset:
    """The settings a few-step model's authors give: `sampler` (a registry name), `scheduler` (a schedule type),
    `steps`, guidance `scale` (1: none); None where they say nothing. `model` names what was recognised, `source`
    the file or setting that told, `note` what differs from the authors' own code, and `unsupported` why the model
    cannot run here at all."""

    model: str
    source: str
    sampler: str | None = None
    scheduler: str | None = None
    steps: int | None = None
    scale: float | None = None
    note: str = ""
    unsupported: str = ""

    def request_fields(self) -> dict[str, Any]:
        """The `Request` keywords the preset sets (sampler, scheduler, steps, scale)."""
        fields = {"sampler": self.sampler, "scheduler": self.scheduler, "steps": self.steps, "scale": self.scale}
        return {key: value for key, value in fields.items() if value is not None}

    def describe(self) -> str:
        """"SDXL-Lightning 4-step (sdxl_lightning_4step_lora.safetensors): euler, Trailing, 4 steps, scale 1"."""
        parts = [self.sampler, self.scheduler, self.steps and f"{self.steps} step{'s' if self.steps > 1 else ''}",
                 self.scale is not None and f"scale {self.scale:g}"]
        return f"{self.model} ({self.source}): {', '.join(str(part) for part in parts if part)}"


def _lightning(match: re.Match[str], source: str) -> Preset:
    # huggingface.co/ByteDance/SDXL-Lightning: "Ensure sampler uses 'trailing' timesteps" (EulerDiscreteScheduler),
    # num_inference_steps = the checkpoint's N, guidance_scale=0; ComfyUI: Euler with sgm_uniform
    steps = int(match["steps"])
    if match["x0"]:
        return Preset(f"SDXL-Lightning {steps}-step (x0)", source, unsupported=(
            "the 1-step SDXL-Lightning model predicts the clean latents (diffusers' prediction_type 'sample'), which "
            "this tool's samplers cannot run: use the 2-step model"))
    return Preset(f"SDXL-Lightning {steps}-step", source, "euler", "Trailing", steps, 1.0)


def _hyper_sd(match: re.Match[str], source: str) -> Preset:
    # huggingface.co/ByteDance/Hyper-SD: N-step LoRAs with DDIMScheduler(timestep_spacing="trailing"), N steps,
    # guidance_scale=0; the CFG-preserved LoRAs with guidance 5 (5 to 8) and negative prompts; the 1-step "unified"
    # LoRA with TCDScheduler (eta 1.0), 1 step (1 to 8 work); the 1-step SDXL UNet with LCMScheduler from timestep 800
    steps, base = int(match["steps"]), "Hyper-SDXL" if match["base"].lower() == "xl" else "Hyper-SD15"
    # diffusers' DDIM steps from t to t - T // n; ours to the next trailing timestep: the same when n divides 1000
    uneven = None if 1000 % steps == 0 else (f"diffusers' DDIM steps from each timestep t to t - {1000 // steps}, "
                                             "here to the next trailing timestep, up to one step of 1,000 apart")
    if match["kind"].lower() == "unet":
        return Preset(f"{base} {steps}-step UNet", source, "lcm", "LCM", 1, 1.0,
                      note="the authors start its one step at timestep 800; here it starts at 999")
    if steps == 1:
        return Preset(f"{base} 1-step unified LoRA", source, "lcm", "LCM", 1, 1.0,
                      note="the authors' TCD sampler (eta 1) is run as LCM: the same jumps to the clean estimate and "
                           "fresh noise; 1 to 8 steps work")
    if match["cfg"]:
        return Preset(f"{base} {steps}-step CFG LoRA", source, "ddim", "Trailing", steps, 5.0,
                      note="; ".join(filter(None, [uneven, "guidance 5 to 8 with a negative prompt"])))
    return Preset(f"{base} {steps}-step LoRA", source, "ddim", "Trailing", steps, 1.0, note=uneven or "")


def _lcm(model: str) -> Callable[[re.Match[str], str], Preset]:
    # huggingface.co/latent-consistency/lcm-lora-sdv1-5 (and -sdxl): LCMScheduler, num_inference_steps=4,
    # guidance_scale=0 ("disable guidance"; 1 to 2 also work), 2 to 8 steps
    def preset(match: re.Match[str], source: str) -> Preset:
        return Preset(model, source, "lcm", "LCM", 4, 1.0)
    return preset


def _turbo(model: str) -> Callable[[re.Match[str], str], Preset]:
    # huggingface.co/stabilityai/sdxl-turbo (and sd-turbo): num_inference_steps=1, guidance_scale=0.0 ("the model was
    # trained without it"), 512x512; its scheduler config: EulerAncestralDiscreteScheduler, timestep_spacing "trailing"
    def preset(match: re.Match[str], source: str) -> Preset:
        return Preset(model, source, "euler_a", "Trailing", 1, 1.0)
    return preset


# Most specific first: a file matches the first pattern that finds its words.
NAME_PATTERNS: tuple[tuple[re.Pattern[str], Callable[[re.Match[str], str], Preset]], ...] = (
    (re.compile(r"sdxl[-_ ]?lightning[-_ ]?(?P<steps>\d+)[-_ ]?steps?(?P<x0>.*x0)?", re.IGNORECASE), _lightning),
    (re.compile(r"hyper[-_ ]?sd[-_ ]?(?P<base>xl|15)[-_ ]?(?P<steps>\d+)[-_ ]?steps?(?P<cfg>[-_ ]?cfg)?"
                r"[-_ ]?(?P<kind>lora|unet)", re.IGNORECASE), _hyper_sd),
    (re.compile(r"lcm[-_ ]?lora|lora[-_ ]?lcm", re.IGNORECASE), _lcm("LCM-LoRA")),
    (re.compile(r"(?<![a-z])lcm(?![a-z])", re.IGNORECASE), _lcm("LCM")),
    (re.compile(r"sd[-_ ]?xl[-_ ]?turbo", re.IGNORECASE), _turbo("SDXL Turbo")),
    (re.compile(r"(?<![a-z])sd[-_ ]?turbo", re.IGNORECASE), _turbo("SD Turbo")),
)

# diffusers scheduler classes -> our samplers, for a folder's scheduler config
SCHEDULER_CLASSES = {"EulerDiscreteScheduler": "euler", "EulerAncestralDiscreteScheduler": "euler_a",
                     "DDIMScheduler": "ddim", "LCMScheduler": "lcm", "TCDScheduler": "lcm"}


def few_step_preset(ckpt: str | os.PathLike | None, loras: Sequence[str | os.PathLike] = (),
                    scheduler_config: Mapping[str, Any] | None = None,
                    guidance_embedded: bool = False) -> Preset | None:
    """The authors' settings for a few-step model, or None: recognised from the LoRAs (paths or `<lora:>` tag names;
    they are what usually makes a model few-step), then the checkpoint (a file or a diffusers folder), by name,
    safetensors metadata title, or a diffusers `scheduler_config` (a plain dict of scheduler/scheduler_config.json).
    `guidance_embedded`: the checkpoint's UNet takes the guidance scale as an input (LCM_Dreamshaper's
    `time_cond_proj_dim`), whose LCM preset then guides at its authors' scale instead of none."""
    preset = _named_preset(ckpt, loras) or (scheduler_preset(scheduler_config) if scheduler_config else None)
    if preset is not None and guidance_embedded and preset.sampler == "lcm":
        # huggingface.co/SimianLuo/LCM_Dreamshaper_v7: num_inference_steps=4, guidance_scale=8.0 (w = scale - 1)
        return replace(preset, model=f"{preset.model} with embedded guidance", scale=EMBEDDED_GUIDANCE_SCALE)
    return preset


EMBEDDED_GUIDANCE_SCALE = 8.0


def _named_preset(ckpt: str | os.PathLike | None, loras: Sequence[str | os.PathLike]) -> Preset | None:
    for path in [*loras, *([ckpt] if ckpt else [])]:
        for text in _telling_texts(path):
            for pattern, make in NAME_PATTERNS:
                match = pattern.search(text)
                if match:
                    return make(match, Path(path).name)
    return None


def scheduler_preset(config: Mapping[str, Any]) -> Preset | None:
    """What a diffusers scheduler config says about a few-step model: the LCM or TCD scheduler, trailing timesteps,
    or "sample" prediction (which no sampler here runs); None for an ordinary one."""
    kind = str(config.get("_class_name", ""))
    source = f"scheduler {kind or 'config'}"
    if config.get("prediction_type") == "sample":
        return Preset("an x0-predicting model", source, unsupported=(
            "its scheduler predicts the clean latents (prediction_type 'sample'), which this tool's samplers cannot "
            "run"))
    if kind in ("LCMScheduler", "TCDScheduler"):
        # diffusers' LatentConsistencyModelPipeline takes 4 steps by default
        return Preset("an LCM-distilled model", source, "lcm", "LCM", 4, 1.0)
    if config.get("timestep_spacing") == "trailing" and kind in SCHEDULER_CLASSES:
        return Preset("a model sampled on trailing timesteps", source, SCHEDULER_CLASSES[kind], "Trailing")
    return None


def _telling_texts(path: str | os.PathLike) -> list[str]:
    """What may name the model: the file's name (a generic one's folders instead) and its metadata titles."""
    path = Path(path)
    texts = [path.stem]
    if GENERIC_NAMES.match(path.stem):
        texts = [parent.name for parent in path.parents[:FOLDER_LEVELS]]
    return texts + _metadata_titles(path)


def _metadata_titles(path: Path) -> list[str]:
    metadata = safetensors_metadata(path)
    return [str(metadata[key])[:TITLE_LENGTH] for key in METADATA_TITLES if key in metadata]
