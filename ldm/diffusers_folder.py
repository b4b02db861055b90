"""Models saved in diffusers' folder layout (`model_index.json`, `unet/`, `vae/`, `text_encoder*/`, `scheduler/`),
read into the released key layout and described by a released config with the folder's own values.

Only what a model needs is read: each component's `config.json`, its weights (`.safetensors`, else `.bin` through
the same weights-only loader as `.ckpt` files; the `fp16` variant when the full-precision file is absent; sharded
files through their index) and the scheduler's settings. Tokenizer folders are not read: every SD 1.x/2.x/XL model
uses CLIP's vocabulary, which this package carries. Nothing is downloaded and nothing in the folder is run: the
JSON files are data, bounded in size, and the class names they hold are compared, never imported.
"""
from __future__ import annotations

import functools
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from ldm.checkpoint_layout import INPAINTING_CHANNELS, UPSCALER_CHANNELS
from ldm.checkpoints import CheckpointError, file_sha256, read_tensors
from ldm.diffusers_names import (UNetLayout, hf_text_state_dict, open_clip_state_dict, prefixed, unet_state_dict,
                                 vae_state_dict)

MODEL_INDEX = "model_index.json"
JSON_LIMIT = 4 << 20  # the largest config or shard index accepted; released ones are a few KiB
COMPONENT_STEM = "diffusion_pytorch_model"  # diffusers' own models' weights (transformers' are `model.*`)
WEIGHT_STEMS = {"unet": COMPONENT_STEM, "vae": COMPONENT_STEM, "text_encoder": "model", "text_encoder_2": "model"}
# diffusers' schedule names -> CompVis' (`make_beta_schedule`): its "scaled_linear" is CompVis' "linear"
BETA_SCHEDULES = {"scaled_linear": "linear", "linear": "sqrt_linear"}
MAX_COUNT = 4096  # the most heads or layers a config may state; released models use at most 64
MAX_TRAIN_STEPS = 10_000  # diffusion training steps a scheduler may state; released models use 1,000
TEXT_ACTIVATIONS = {"v1": "quick_gelu", "v2": "gelu", "xl-base": "quick_gelu"}  # OpenAI CLIP vs OpenCLIP towers


class FolderError(Exception):
    """A diffusers folder this package cannot use; the message says why and what to do."""


def _config_errors(function: Callable[..., Any]) -> Callable[..., Any]:
    """`function` with a config value of the wrong type or form (a string for a count, a number for a list)
    reported as a FolderError naming the folder, not as a traceback."""
    @functools.wraps(function)
    def checked(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except (TypeError, ValueError, AttributeError, IndexError, ZeroDivisionError, OverflowError) as error:
            folder = args[0]
            raise FolderError(f"{getattr(folder, 'path', folder)}: a value in its config files has the wrong form "
                              f"({type(error).__name__}: {str(error)[:200]})") from None
    return checked


def is_diffusers_folder(path: str | os.PathLike) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, MODEL_INDEX))


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from a folder file, bounded in size; FolderError for anything else."""
    try:
        size = path.stat().st_size
        if size > JSON_LIMIT:
            raise FolderError(f"{path} is {size} bytes; a diffusers config is a few KiB: is it the right file?")
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FolderError(f"{path} is missing: the diffusers folder is incomplete") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise FolderError(f"cannot read {path}: {error}") from None
    if not isinstance(value, dict):
        raise FolderError(f"{path} does not hold a JSON object")
    return value


@dataclass(frozen=True)
class DiffusersFolder:
    """A diffusers model folder: its components' configs (`configs["unet"]`, ...) and the scheduler's settings."""

    path: Path
    configs: dict[str, dict[str, Any]] = field(repr=False)
    scheduler: dict[str, Any] = field(repr=False)
    index: dict[str, Any] = field(repr=False, default_factory=dict)
    low_res_scheduler: dict[str, Any] = field(repr=False, default_factory=dict)  # the x4 upscaler's noise augmentation

    @property
    @_config_errors
    def family(self) -> str:
        """The released config's family: `text_family`, with "-inpainting" for SD 1.x/2.x UNets that also take the
        mask and the masked image (9 input channels), or "x4-upscaler" for SD 2's x4 upscaler (7 channels: the
        low-resolution image too; its noise level a class label)."""
        family = self.text_family
        unet = self.configs["unet"]
        if int(unet.get("in_channels", 4)) == UPSCALER_CHANNELS and unet.get("num_class_embeds") and family == "v2":
            return "x4-upscaler"
        if int(unet.get("in_channels", 4)) == INPAINTING_CHANNELS:
            if family.startswith("xl"):
                raise FolderError(f"{self.path}/unet takes 9 input channels (SDXL inpainting), which is not "
                                  "supported: use an SD 1.x/2.x inpainting model, or SDXL base with scripts/inpaint.py")
            family += "-inpainting"
        return family

    @property
    @_config_errors
    def text_family(self) -> str:
        """"v1", "v2", "xl-base" or "xl-refiner": the text encoders the folder holds."""
        encoders = [name for name in ("text_encoder", "text_encoder_2") if name in self.configs]
        if encoders == ["text_encoder", "text_encoder_2"]:
            return "xl-base"
        if encoders == ["text_encoder_2"]:
            return "xl-refiner"
        if encoders == ["text_encoder"]:
            # SD 2.x's OpenCLIP tower, stored as a Hugging Face CLIP model, is the one with plain GELU
            return "v2" if self.configs["text_encoder"].get("hidden_act") == "gelu" else "v1"
        raise FolderError(f"{self.path} has no text encoder (text_encoder/ or text_encoder_2/): it is not a Stable "
                          "Diffusion text-to-image model")

    @property
    @_config_errors
    def sample_size(self) -> int:
        """The UNet's latent size, the images' default size / 8 (SD 1.x 64, SD 2.x-768 96, SDXL 128, Turbo 64)."""
        return int(self.configs["unet"].get("sample_size", 64))

    @property
    def v_prediction(self) -> bool:
        return self.scheduler.get("prediction_type", "epsilon") == "v_prediction"

    def weights_file(self, component: str) -> Path:
        return weights_file(self.path / component, WEIGHT_STEMS[component])


def weights_file(folder: Path, stem: str) -> Path:
    """A component folder's weights: full precision before the fp16 variant, safetensors before pickles, a single
    file before a sharded index."""
    for name in (f"{stem}.safetensors", f"{stem}.safetensors.index.json", f"{stem}.fp16.safetensors",
                 f"{stem}.safetensors.index.fp16.json", f"{stem}.bin", f"{stem}.bin.index.json",
                 f"{stem}.fp16.bin", f"{stem}.bin.index.fp16.json"):
        if (folder / name).is_file():
            return folder / name
    raise FolderError(f"{folder} holds no weights ({stem}.safetensors or {stem}.bin): the diffusers folder is "
                      "incomplete")


@functools.lru_cache(maxsize=8)
def _read_folder(path: Path, mtime_ns: int) -> DiffusersFolder:
    index = read_json(path / MODEL_INDEX)
    configs = {}
    for component in WEIGHT_STEMS:
        entry = index.get(component)
        if isinstance(entry, list) and entry and entry[0] is not None:
            configs[component] = read_json(path / component / "config.json")
    for needed in ("unet", "vae"):
        if needed not in configs:
            raise FolderError(f"{path / MODEL_INDEX} names no {needed}: this is not a Stable Diffusion model folder "
                              f"(its pipeline is {index.get('_class_name', 'unnamed')})")
    schedulers = {name: read_json(path / name / "scheduler_config.json") if (
        path / name / "scheduler_config.json").is_file() else {} for name in ("scheduler", "low_res_scheduler")}
    return DiffusersFolder(path, configs, schedulers["scheduler"], index, schedulers["low_res_scheduler"])


def read_folder(path: str | os.PathLike) -> DiffusersFolder:
    """The folder's configs (read once per change of `model_index.json`)."""
    path = Path(path).resolve()
    try:
        mtime = (path / MODEL_INDEX).stat().st_mtime_ns
    except OSError as error:
        raise FolderError(f"cannot read {path / MODEL_INDEX}: {error.strerror}") from None
    return _read_folder(path, mtime)


def _shard_files(index_file: Path) -> list[Path]:
    weight_map = read_json(index_file).get("weight_map")
    if not isinstance(weight_map, dict):
        raise FolderError(f"{index_file} has no weight_map: the sharded weights cannot be found")
    names = sorted(set(map(str, weight_map.values())))
    if any(Path(name).name != name or name in ("", ".", "..") for name in names):
        raise FolderError(f"{index_file} names shard files outside its folder; refusing to read them")
    return [index_file.parent / name for name in names]


def read_component(file: Path, shapes_only: bool) -> dict[str, torch.Tensor]:
    """A component's tensors (meta tensors of their shapes and dtypes with `shapes_only`), shards merged."""
    files = _shard_files(file) if file.name.endswith(".json") else [file]
    tensors: dict[str, torch.Tensor] = {}
    for part in files:
        try:
            tensors.update(read_tensors(part, shapes_only))
        except FileNotFoundError:
            raise FolderError(f"{part} is missing: the diffusers folder is incomplete") from None
        except CheckpointError as error:
            raise FolderError(str(error)) from None
    return tensors


TEXT_LAYER = re.compile(r"^(?:text_model\.)?encoder\.layers\.(\d+)\.")


def read_file_or_folder(path: str | os.PathLike, component: str, shapes_only: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, of a diffusers component folder (`config.json` + `diffusion_pytorch_model.*`),
    or of a whole model folder's `component` (its `vae/`, `unet/`, ...)."""
    if os.path.isdir(path):
        folder = Path(path) / component if is_diffusers_folder(path) else Path(path)
        return read_component(weights_file(folder, COMPONENT_STEM), shapes_only)
    return read_tensors(path, shapes_only)


def _text_layers(weights: Mapping[str, Any]) -> int:
    """How many encoder layers a Hugging Face CLIP text model's weights hold (what is converted is what is there)."""
    return len({match.group(1) for match in map(TEXT_LAYER.match, weights) if match})


@_config_errors
def folder_state_dict(folder: DiffusersFolder, shapes_only: bool = False) -> dict[str, torch.Tensor]:
    """The folder's weights under the released checkpoints' keys (see ldm.diffusers_names)."""
    family, configs = folder.text_family, folder.configs
    weights = {name: read_component(folder.weights_file(name), shapes_only) for name in configs}
    try:
        state_dict = prefixed(unet_state_dict(weights["unet"], UNetLayout.from_names(weights["unet"])),
                              "model.diffusion_model.")
        state_dict.update(prefixed(vae_state_dict(weights["vae"]), "first_stage_model."))
        if family == "v1":
            state_dict.update(prefixed(hf_text_state_dict(weights["text_encoder"]), "cond_stage_model.transformer."))
        elif family == "v2":
            tower = open_clip_state_dict(weights["text_encoder"], _text_layers(weights["text_encoder"]))
            width = tower["ln_final.weight"].shape[0]
            tower["text_projection"] = torch.empty(width, 0, device=tower["ln_final.weight"].device)  # unused by SD 2
            state_dict.update(prefixed(tower, "cond_stage_model.model."))
        else:
            big_g = "conditioner.embedders.1.model." if family == "xl-base" else "conditioner.embedders.0.model."
            if family == "xl-base":
                state_dict.update(prefixed(hf_text_state_dict(weights["text_encoder"]),
                                           "conditioner.embedders.0.transformer."))
            state_dict.update(prefixed(open_clip_state_dict(weights["text_encoder_2"],
                                                            _text_layers(weights["text_encoder_2"])), big_g))
    except KeyError as error:
        raise FolderError(f"{folder.path}: {error.args[0] if error.args else error} (not a weight of a model this "
                          "package builds)") from None
    return state_dict


def _heads(unet: Mapping[str, Any], widths: Sequence[int]) -> dict[str, int]:
    """UNetModel's num_heads / num_head_channels from diffusers' `attention_head_dim` (which, despite its name,
    counts heads: an int for every level, SD 1.x's 8, or one per level, SD 2.x's and SDXL's width / 64), checked
    against the levels' widths (read from the weights)."""
    heads = unet.get("num_attention_heads") or unet.get("attention_head_dim", 8)
    if _is_count(heads):
        if any(width % heads for width in widths):
            raise FolderError(f"unet/config.json: {heads} heads do not divide the UNet's widths {list(widths)}")
        return {"num_heads": heads, "num_head_channels": -1}
    if not isinstance(heads, list) or len(heads) != len(widths) or not all(map(_is_count, heads)):
        raise FolderError(f"unet/config.json: attention_head_dim {heads!r} is not a head count per level "
                          f"({len(widths)} levels)")
    head_widths = {width // count for width, count in zip(widths, heads) if width % count == 0}
    if len(head_widths) != 1:
        raise FolderError(f"unet/config.json: heads {heads} over widths {list(widths)} are not one head width, "
                          "which this package's UNet needs")
    return {"num_heads": -1, "num_head_channels": head_widths.pop()}


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= MAX_COUNT


def _number(config: Mapping[str, Any], key: str, default: float, low: float, high: float, where: str) -> float:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise FolderError(f"{where}: {key} {value!r} is not a number in {low}..{high}")
    return value


def _refuse_unsupported(folder: DiffusersFolder) -> None:
    unet, scheduler = folder.configs["unet"], folder.scheduler
    for key, why in (("class_embed_type", "a class embedding"), ("encoder_hid_dim", "an image-prompt projection")):
        if unet.get(key) is not None:
            raise FolderError(f"{folder.path}/unet has {why} ({key}), which this package's UNet does not build")
    if scheduler.get("beta_schedule", "scaled_linear") not in BETA_SCHEDULES:
        raise FolderError(f"{folder.path}/scheduler: beta_schedule {scheduler['beta_schedule']!r} is not supported "
                          f"(only {', '.join(BETA_SCHEDULES)})")
    if scheduler.get("rescale_betas_zero_snr"):
        raise FolderError(f"{folder.path}/scheduler: rescale_betas_zero_snr is not supported")
    if scheduler.get("prediction_type", "epsilon") not in ("epsilon", "v_prediction"):
        raise FolderError(f"{folder.path}/scheduler: prediction_type {scheduler['prediction_type']!r} is not "
                          "supported (epsilon or v_prediction)")
    if folder.configs["vae"].get("shift_factor") not in (None, 0, 0.0):
        raise FolderError(f"{folder.path}/vae has a shift_factor: it is not a Stable Diffusion 1.x/2.x/XL autoencoder")


@_config_errors
def folder_overrides(folder: DiffusersFolder, structure: Mapping[str, Any]) -> dict[str, Any]:
    """Values of the family's released config (dotted paths) that only the folder's configs hold, each checked:
    the UNet's and text encoders' heads, the latent scale, the noise schedule, the prediction type and SDXL's empty
    prompt rule. `structure`: the overrides read from the weights (`ldm.loading.params_from_shapes`), which give
    every width; the heads must divide them."""
    _refuse_unsupported(folder)
    family, configs, scheduler = folder.text_family, folder.configs, folder.scheduler
    root, xl = "model.params.", family.startswith("xl")
    unet_root = f"{root}{'network_config' if xl else 'unet_config'}.params."
    widths = [structure[unet_root + "model_channels"] * mult for mult in structure[unet_root + "channel_mult"]]
    overrides = {unet_root + name: value for name, value in _heads(configs["unet"], widths).items()}
    where = f"{folder.path}/vae/config.json"
    overrides[root + "scale_factor"] = float(_number(configs["vae"], "scaling_factor", 0.18215, 1e-6, 1e3, where))
    overrides.update(_text_overrides(folder, structure))
    where = f"{folder.path}/scheduler/scheduler_config.json"
    start = float(_number(scheduler, "beta_start", 0.00085, 1e-8, 0.5, where))
    end = float(_number(scheduler, "beta_end", 0.012, start, 0.999, where))
    steps = int(_number(scheduler, "num_train_timesteps", 1000, 2, MAX_TRAIN_STEPS, where))
    schedule = BETA_SCHEDULES[scheduler.get("beta_schedule", "scaled_linear")]
    if xl:
        if schedule != "linear":
            raise FolderError(f"{where}: SDXL models here take the scaled_linear beta schedule only")
        denoiser = f"{root}denoiser_config.params."
        overrides.update({denoiser + "num_idx": steps,
                          denoiser + "discretization_config.params.linear_start": start,
                          denoiser + "discretization_config.params.linear_end": end,
                          denoiser + "discretization_config.params.num_timesteps": steps})
        if folder.v_prediction:
            overrides[denoiser + "scaling_config.target"] = "sgm.modules.diffusionmodules.denoiser_scaling.VScaling"
        if isinstance(folder.index.get("force_zeros_for_empty_prompt"), bool):
            overrides[root + "force_zeros_for_empty_prompt"] = folder.index["force_zeros_for_empty_prompt"]
    else:
        size = folder.sample_size
        overrides.update({root + "linear_start": start, root + "linear_end": end, root + "timesteps": steps,
                          root + "beta_schedule": schedule, root + "image_size": size, unet_root + "image_size": size,
                          root + "parameterization": "v" if folder.v_prediction else "eps"})
        overrides.update(_cross_attention_only(configs["unet"], len(widths), unet_root))
    if folder.family == "x4-upscaler":
        overrides.update(_upscaler_overrides(folder))
    return overrides


def _cross_attention_only(unet: Mapping[str, Any], levels: int, unet_root: str) -> dict[str, Any]:
    """diffusers' `only_cross_attention` (a bool or one per level: the first attention of those blocks attends to
    the text too, as SD 2's x4 upscaler does) as `disable_self_attentions`; nothing when it is off everywhere."""
    value = unet.get("only_cross_attention", False)
    flags = [value] * levels if isinstance(value, bool) else value
    if not isinstance(flags, list) or len(flags) != levels or not all(isinstance(flag, bool) for flag in flags):
        raise FolderError(f"unet/config.json: only_cross_attention {value!r} is not a bool or one per level")
    middle = unet.get("mid_block_only_cross_attention") or False
    if not any(flags) and not middle:
        return {}
    return {unet_root + "disable_self_attentions": flags, unet_root + "disable_middle_self_attn": bool(middle)}


def _upscaler_overrides(folder: DiffusersFolder) -> dict[str, Any]:
    """The x4 upscaler's noise augmentation of the low-resolution image: its largest noise level (model_index's
    `max_noise_level`) and its schedule (`low_res_scheduler`, a scaled-linear DDPM one)."""
    augmentation = "model.params.low_scale_config.params."
    where = f"{folder.path}/low_res_scheduler/scheduler_config.json"
    low = folder.low_res_scheduler
    if low.get("beta_schedule", "scaled_linear") != "scaled_linear":
        raise FolderError(f"{where}: beta_schedule {low['beta_schedule']!r} is not the scaled_linear one the x4 "
                          "upscaler's noise augmentation takes")
    start = float(_number(low, "beta_start", 0.0001, 1e-8, 0.5, where))
    return {augmentation + "noise_schedule_config.linear_start": start,
            augmentation + "noise_schedule_config.linear_end": float(_number(low, "beta_end", 0.02, start, 0.999,
                                                                            where)),
            augmentation + "max_noise_level": int(_number(folder.index, "max_noise_level", 350, 1, 1000,
                                                          f"{folder.path}/model_index.json"))}


def _text_overrides(folder: DiffusersFolder, structure: Mapping[str, Any]) -> dict[str, Any]:
    """The text encoders' heads (checked against their widths), and SD 2.x's layer choice: diffusers stores the 23
    blocks SD 2.x uses, so all of them, then ln_final, is its "penultimate"."""
    family, configs = folder.text_family, folder.configs
    emb = "model.params.conditioner_config.params.emb_models."
    places = {"v1": [("text_encoder", "model.params.cond_stage_config.params.")],
              "v2": [("text_encoder", "model.params.cond_stage_config.params.")],
              "xl-base": [("text_encoder", emb + "0.params."), ("text_encoder_2", emb + "1.params.")],
              "xl-refiner": [("text_encoder_2", emb + "0.params.")]}[family]
    overrides: dict[str, Any] = {}
    for component, params in places:
        config = configs[component]
        where = f"{folder.path}/{component}/config.json"
        activation = config.get("hidden_act", "quick_gelu")
        expected = TEXT_ACTIVATIONS.get(family, "gelu") if component == "text_encoder" else "gelu"
        if activation != expected:
            raise FolderError(f"{where}: hidden_act {activation!r} where this model family's encoder uses "
                              f"{expected!r}")
        heads, width = config.get("num_attention_heads"), structure.get(params + "width")
        if not _is_count(heads) or width is None or width % heads:
            raise FolderError(f"{where}: num_attention_heads {heads!r} does not divide the encoder's width {width}")
        overrides[params + "heads"] = heads
    if family == "v2":
        params = places[0][1]
        overrides.update({params + "layer": "last", params + "embed_dim": 0})
    return overrides


def folder_hash(folder: DiffusersFolder) -> str:
    """The 10-hex "Model hash" of a folder's model: that of its UNet's weights file (or shard index)."""
    return file_sha256(folder.weights_file("unet"))[:10]
