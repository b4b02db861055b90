"""ControlNet files and their use: load one strictly, attach it to a loaded model so every sampler runs under it.

Released files come in three layouts, all read here: ControlNet 1.0's whole ControlLDM (`control_sd15_canny.pth`:
base model + `control_model.*`), ControlNet 1.1's `control_model.*` alone (`control_v11p_sd15_canny.pth`), and the
pruned re-saves without the prefix (`input_hint_block.*`, `zero_convs.*`, ...; e.g. thibaud/controlnet-sd21 and many
`*_fp16.safetensors`). The config is the one given, else `<file>.yaml` beside the file (ControlNet 1.1 ships one),
else cldm_v15.yaml / cldm_v21.yaml chosen by the cross-attention width.
"""
from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any, Mapping, Sequence, TypeVar, Union

import torch
from torch import nn

from cldm.cldm import ControlNet, control_residuals
from ldm.checkpoints import CheckpointError, model_hash
from ldm.diffusers_folder import COMPONENT_STEM, FolderError, read_file_or_folder, weights_file
from ldm.diffusers_names import controlnet_state_dict
from ldm.loading import LoadError, assign_weights, check_keys, instantiate_on_meta, load_config

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "controlnet"
CONTROL_PREFIX = "control_model."
HINT_KEY = "input_hint_block.0.weight"  # present in every ControlNet, in no other kind of file
CONFIG_BY_CONTEXT_WIDTH = {768: "cldm_v15.yaml", 1024: "cldm_v21.yaml"}
BASE_BY_CONTEXT_WIDTH = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}
CROSS_ATTENTION_KEY = "attn2.to_k.weight"  # [inner, context width]: the text encoder the model was trained with

Value = TypeVar("Value")


def base_model_name(context_width: int | None) -> str:
    """'SD 1.x' for 768, 'SD 2.x' for 1024, ... (what users call the base a width belongs to)."""
    return BASE_BY_CONTEXT_WIDTH.get(context_width, f"a model with {context_width}-wide text embeddings")


def controlnet_weights(state_dict: Mapping[str, Value], name: str = "this file") -> dict[str, Value]:
    """The ControlNet's entries of a checkpoint (tensors or shapes), keyed as `ControlNet` names them; a LoadError
    saying what the file is when it holds no ControlNet."""
    if "difference" in state_dict:  # sd-webui-controlnet's extract_controlnet_diff.py: weights minus SD 1.5's
        raise LoadError(f"{name} is a 'difference' ControlNet (weights stored relative to a base model), which is not "
                        "supported: use the full ControlNet file (control_v11p_sd15_*.pth / .safetensors)")
    if any(key.startswith(CONTROL_PREFIX) for key in state_dict):  # 1.0 (whole ControlLDM) and 1.1 files
        return {key[len(CONTROL_PREFIX):]: value for key, value in state_dict.items() if key.startswith(CONTROL_PREFIX)}
    if HINT_KEY in state_dict:  # pruned re-saves without the prefix
        return dict(state_dict)
    if any(key.startswith("controlnet_cond_embedding.") for key in state_dict):  # diffusers' ControlNetModel
        try:
            return controlnet_state_dict(state_dict)
        except KeyError as error:
            raise LoadError(f"{name} is a ControlNet in diffusers' layout with weights no ControlNet here has: "
                            f"{error.args[0] if error.args else error}") from None
    if any(key.startswith("model.diffusion_model.") for key in state_dict):
        raise LoadError(f"{name} is a Stable Diffusion checkpoint without a ControlNet: pass it as --ckpt and a "
                        "ControlNet file (control_*.pth / .safetensors) as --controlnet")
    raise LoadError(f"{name} is not a ControlNet file: it has no control_model.* or input_hint_block.* weights")


def read_controlnet(path: str | os.PathLike, shapes_only: bool = False) -> dict[str, Any]:
    """The tensors (or, with `shapes_only`, their shapes) of a ControlNet file or diffusers ControlNet folder
    (`config.json` and `diffusion_pytorch_model.*`, as lllyasviel/control_v11p_sd15_canny on the hub)."""
    try:
        tensors = read_file_or_folder(path, "controlnet", shapes_only)
        return {key: tuple(value.shape) for key, value in tensors.items()} if shapes_only else tensors
    except (CheckpointError, FolderError) as error:
        raise LoadError(str(error)) from None


def controlnet_hash(path: str | os.PathLike) -> str:
    """The 10-hex hash recorded for a ControlNet: of its file, or of a folder's weights file."""
    if os.path.isdir(path):
        try:
            return model_hash(weights_file(Path(path), COMPONENT_STEM))
        except FolderError as error:
            raise LoadError(str(error)) from None
    return model_hash(path)


def context_width_of(weights: Mapping[str, Any]) -> int | None:
    """The text-embedding width a UNet or ControlNet state dict (tensors or shapes) cross-attends to; None without
    cross-attention."""
    for key, value in weights.items():
        if key.endswith(CROSS_ATTENTION_KEY):
            return int(tuple(value.shape if hasattr(value, "shape") else value)[1])
    return None


def context_width(module: nn.Module) -> int | None:
    """The text-embedding width a UNet or ControlNet module cross-attends to; None without cross-attention."""
    for name, child in module.named_modules():
        if name.endswith("attn2.to_k") and isinstance(child, nn.Linear):
            return child.in_features
    return None


def resolve_controlnet_config(path: str | os.PathLike, config: str | os.PathLike | None,
                              weights: Mapping[str, Any]) -> Path:
    """The given config, else `<file>.yaml` beside the file, else the released config for its context width."""
    if config is not None:
        if not Path(config).is_file():
            raise LoadError(f"ControlNet config {config} does not exist (released configs are in {CONFIG_DIR})")
        return Path(config)
    beside = Path(path).with_suffix(".yaml")
    if beside.is_file():
        return beside
    width = context_width_of(weights)
    if width not in CONFIG_BY_CONTEXT_WIDTH:
        raise LoadError(f"cannot tell which config the ControlNet {path} needs (it cross-attends to {width}-wide text "
                        f"embeddings, neither SD 1.x's 768 nor SD 2.x's 1024): put its yaml beside it as "
                        f"{beside.name}")
    return CONFIG_DIR / CONFIG_BY_CONTEXT_WIDTH[width]


def load_controlnet(path: str | os.PathLike, config: str | os.PathLike | None = None, *,
                    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                    trust_config: bool = False) -> ControlNet:
    """The ControlNet in `path` (any of the released layouts), loaded strictly into the `control_stage_config` of
    its cldm yaml, in eval mode on `device` in `dtype`. `trust_config`: as for `ldm.loading.load_model` (a yaml
    beside a downloaded ControlNet builds only this project's classes unless trusted)."""
    weights = controlnet_weights(read_controlnet(path), str(path))
    config_path = resolve_controlnet_config(path, config, weights)
    params = load_config(config_path, trust_config).model.get("params") or {}
    if "control_stage_config" not in params:
        raise LoadError(f"config {config_path} has no model.params.control_stage_config: pass a ControlNet yaml like "
                        f"{CONFIG_DIR / 'cldm_v15.yaml'}")
    try:
        controlnet = instantiate_on_meta(params.control_stage_config, trust_config)
    except Exception as error:  # noqa: BLE001 - a config is user input; see ldm.loading._build
        reason = str(error.args[0] if error.args else error).strip()
        reason = reason.splitlines()[0][:300] if reason else type(error).__name__
        raise LoadError(f"config {config_path.name} cannot build its ControlNet ({reason}): check its "
                        f"control_stage_config, or remove {config_path.name} to use the released config") from None
    if not isinstance(controlnet, ControlNet):
        raise LoadError(f"config {config_path} builds {type(controlnet).__name__}, not cldm.cldm.ControlNet")
    controlnet.global_average_pooling = bool(params.get("global_average_pooling", False))
    width = context_width_of(weights)
    advice = (f"the file is a ControlNet for {base_model_name(width)}: put its own yaml beside it as "
              f"{Path(path).with_suffix('.yaml').name}")
    assign_weights(controlnet, check_keys(controlnet, weights, f"config {config_path.name}", advice),
                   torch.device(device), dtype)
    return controlnet.eval().requires_grad_(False)


def check_compatible(unet: nn.Module, controlnet: ControlNet, name: str = "the ControlNet") -> None:
    """A ValueError (one line) when `controlnet` was not trained for a UNet shaped like `unet`."""
    unet_width, control_width = context_width(unet), context_width(controlnet)
    if unet_width != control_width:
        raise ValueError(f"{name} is for {base_model_name(control_width)} (text embeddings {control_width} wide) but "
                         f"the model is {base_model_name(unet_width)} ({unet_width} wide): use a ControlNet made "
                         f"for the model's family")
    unet_shapes = {key: value.shape for key, value in unet.input_blocks.state_dict().items()}
    control_shapes = {key: value.shape for key, value in controlnet.input_blocks.state_dict().items()}
    if unet_shapes != control_shapes or getattr(unet, "in_channels", None) != controlnet.in_channels:
        raise ValueError(f"{name}'s encoder is not a copy of this model's UNet encoder (another architecture or "
                         "input channels): use a ControlNet made for this base model")


class AttachedControlNet:
    """A ControlNet steering a UNet: before every UNet call it runs on the same latents, timesteps and text and hands
    its scaled residuals to the UNet's `control` argument (summed with those of other attached ControlNets).
    `remove()` (or leaving a `with` block) restores the UNet."""

    def __init__(self, unet: nn.Module, controlnet: ControlNet, hint: torch.Tensor,
                 scale: Union[float, Sequence[float]]):
        self.unet, self.controlnet, self.hint, self.scale = unet, controlnet, hint, scale
        self._signature = inspect.signature(unet.forward)
        self._handle = unet.register_forward_pre_hook(self._add_control, with_kwargs=True)

    def _add_control(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        bound = self._signature.bind(*args, **kwargs)
        x, timesteps = bound.arguments["x"], bound.arguments["timesteps"]
        if self.hint.device != x.device:
            self.hint = self.hint.to(x.device)
        residuals = control_residuals(self.controlnet, x, self.hint, timesteps, bound.arguments.get("context"),
                                      self.scale)
        earlier = bound.arguments.get("control")
        if earlier is not None:
            residuals = [first + second for first, second in zip(earlier, residuals)]
        bound.arguments["control"] = residuals
        return bound.args, bound.kwargs

    def remove(self) -> None:
        self._handle.remove()

    def __enter__(self) -> "AttachedControlNet":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


def attach_controlnet(model: nn.Module, controlnet: ControlNet, hint_image: torch.Tensor,
                      scale: Union[float, Sequence[float]] = 1.0) -> AttachedControlNet:
    """Make every `model.apply_model` call (so every sampler, with or without guidance) run under `controlnet`.

    `hint_image`: [B, 3, H, W] or [3, H, W] RGB in [0, 1] at the output's pixel size (ControlNet's convention; an
    edge map or pose image as the ControlNet was trained on, no preprocessing here); one image serves the whole
    batch, both halves of a guidance batch included. `scale`: ControlNet's control strength, one float or one per
    residual (13 for SD 1.x/2.x).
    """
    unet = model.model.diffusion_model
    check_compatible(unet, controlnet)
    if hint_image.dim() == 3:
        hint_image = hint_image.unsqueeze(0)  # [C, H, W] -> [1, C, H, W]
    if hint_image.dim() != 4 or hint_image.shape[1] != controlnet.hint_channels:
        raise ValueError(f"the control image has shape {list(hint_image.shape)}: expected [B, "
                         f"{controlnet.hint_channels}, H, W] (RGB in [0, 1])")
    return AttachedControlNet(unet, controlnet, hint_image, scale)
