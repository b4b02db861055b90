"""Running a model larger than the accelerator's memory: weights live at home (CPU) and visit the device to run.

- model offload: each sub-model (text encoder, UNet, autoencoder) moves to the device when it is called and the
  previously active one goes home; one sub-model's weights are on the device at a time.
- sequential offload: the UNet and the autoencoder are streamed layer by layer (a transformer or attention block
  counts as one layer): only the layer that runs is on the device. The text encoder, which reads its weights
  outside its layers' forward calls, moves as one piece.

Going home costs nothing: the home copy of every weight is kept (pinned for fast copies where the device allows),
so leaving the device only drops the device copy. Calls into a sub-model get their tensor arguments moved to the
device, and its results go back to the device its first tensor argument came from (they stay on the device when
it had none), so callers see the devices they passed in. Fused projections and packed convolutions are bypassed
while weights move (they fall back to the plain path by themselves).
"""
from __future__ import annotations

import copy
import functools
from typing import Any, Callable, Iterable

import torch
from torch import nn

from ldm.modules.attention import CrossAttention, SpatialTransformer
from ldm.modules.diffusionmodules.model import AttnBlock

# Modules whose forward reads their children's weights directly: they move as one piece.
ATOMIC_MODULES = (CrossAttention, SpatialTransformer, AttnBlock)
# Entry points other than forward (which the offload's hooks cover): a sub-model's methods that callers use
# instead of calling it. encode_tokens: text encoders called with token ids (prompt weighting).
METHOD_ENTRIES = ("encode", "decode", "encode_tokens")


def move_tensors(value: Any, device: torch.device) -> Any:
    """`value` with every tensor in it (also inside lists, tuples, dicts and plain objects) on `device`."""
    if torch.is_tensor(value):
        return value.to(device, non_blocking=True)
    if isinstance(value, (list, tuple)):
        moved = [move_tensors(item, device) for item in value]
        return type(value)(moved) if isinstance(value, list) or type(value) is tuple else type(value)(*moved)
    if isinstance(value, dict):
        return type(value)((key, move_tensors(item, device)) for key, item in value.items())
    if hasattr(value, "__dict__") and any(torch.is_tensor(item) for item in vars(value).values()):
        moved = copy.copy(value)
        moved.__dict__.update({key: move_tensors(item, device) for key, item in vars(value).items()})
        return moved
    return value


def first_tensor_device(values: Iterable[Any]) -> torch.device | None:
    for value in values:
        if torch.is_tensor(value):
            return value.device
        if isinstance(value, (list, tuple)):
            found = first_tensor_device(value)
            if found is not None:
                return found
    return None


class WeightSet:
    """The parameters and buffers of some modules, with their home copies, movable as one."""

    def __init__(self, name: str, tensors: list[torch.Tensor], device: torch.device, home: torch.device):
        self.name = name
        self.device = device
        self.tensors = tensors
        pin = home.type == "cpu" and device.type not in ("cpu", "mps", "meta")
        self.homes = [_pinned(tensor.data.to(home)) if pin else tensor.data.to(home) for tensor in tensors]
        for tensor, home_copy in zip(tensors, self.homes):
            tensor.data = home_copy
        self.on_device = False

    def to_device(self) -> None:
        for tensor, home_copy in zip(self.tensors, self.homes):
            tensor.data = home_copy.to(self.device, non_blocking=True)
        self.on_device = True

    def to_home(self) -> None:
        for tensor, home_copy in zip(self.tensors, self.homes):
            tensor.data = home_copy
        self.on_device = False

    def restore(self, device: torch.device) -> None:
        for tensor, home_copy in zip(self.tensors, self.homes):
            tensor.data = home_copy.to(device)


def _pinned(tensor: torch.Tensor) -> torch.Tensor:
    try:
        return tensor.pin_memory()
    except RuntimeError:  # no pinned memory on this build or device: plain copies work too
        return tensor


def _tensors_of(module: nn.Module, recurse: bool) -> list[torch.Tensor]:
    return [*module.parameters(recurse=recurse), *(buffer for buffer in module.buffers(recurse=recurse)
                                                   if buffer is not None)]


class Offload:
    """The hooks of one offloaded model. With `record`, `events` lists every move as (sub-model or layer name,
    "device" | "home"), for tests and for reports."""

    def __init__(self, device: torch.device, home: torch.device, record: bool = False):
        self.device = device
        self.home = home
        self.record = record
        self.events: list[tuple[str, str]] = []
        self.active: WeightSet | None = None
        self.weight_sets: list[WeightSet] = []
        self._removers: list[Callable[[], None]] = []

    # --- moving weights -----------------------------------------------------------------------------------------
    def activate(self, weights: WeightSet) -> None:
        """Make `weights` the one set on the device (model offload)."""
        if self.active is weights:
            return
        if self.active is not None:
            self.active.to_home()
            self.note(self.active.name, "home")
        weights.to_device()
        self.note(weights.name, "device")
        self.active = weights

    def note(self, name: str, where: str) -> None:
        if self.record:
            self.events.append((name, where))

    def visit(self, weights: WeightSet, running: bool) -> None:
        """Bring `weights` to the device for one call (`running`) and send them home after it (sequential)."""
        if running:
            weights.to_device()
        else:
            weights.to_home()
        self.note(weights.name, "device" if running else "home")

    # --- hooks ---------------------------------------------------------------------------------------------------
    def wrap_entry_points(self, module: nn.Module, before: Callable[[], None]) -> None:
        """Around each call of `module` (its hooks) and of its encode/decode methods: `before()`, then run on the
        device, results back to the caller's device."""
        callers: list[torch.device | None] = []  # a stack: calls may nest

        def enter(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            before()
            callers.append(first_tensor_device([*args, *kwargs.values()]))
            return move_tensors(args, self.device), move_tensors(kwargs, self.device)

        def leave(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
            caller = callers.pop() if callers else None  # empty only when a hook before `enter` raised
            return output if caller is None else move_tensors(output, caller)

        self._removers.append(module.register_forward_pre_hook(enter, with_kwargs=True).remove)
        self._removers.append(module.register_forward_hook(leave, with_kwargs=True, always_call=True).remove)
        for method_name in METHOD_ENTRIES:
            method = getattr(module, method_name, None)
            if method is None or method_name in vars(module):
                continue

            @functools.wraps(method)
            def entry(*args: Any, _method: Callable = method, **kwargs: Any) -> Any:
                before()
                caller_device = first_tensor_device([*args, *kwargs.values()])
                result = _method(*move_tensors(args, self.device), **move_tensors(kwargs, self.device))
                return result if caller_device is None else move_tensors(result, caller_device)

            setattr(module, method_name, entry)
            self._removers.append(functools.partial(_remove_attribute, module, method_name))

    def stream_layers(self, name: str, root: nn.Module) -> None:
        """Sequential offload of `root`: every layer's weights visit the device only while that layer runs."""
        for layer_name, layer, recurse in _layers(root):
            weights = WeightSet(f"{name}.{layer_name}" if layer_name else name, _tensors_of(layer, recurse),
                                self.device, self.home)
            self.weight_sets.append(weights)

            def before(module: nn.Module, args: tuple, kwargs: dict, _weights: WeightSet = weights) -> tuple:
                self.visit(_weights, running=True)
                return move_tensors(args, self.device), move_tensors(kwargs, self.device)

            def after(module: nn.Module, args: tuple, output: Any, _weights: WeightSet = weights) -> None:
                self.visit(_weights, running=False)

            self._removers.append(layer.register_forward_pre_hook(before, with_kwargs=True).remove)
            self._removers.append(layer.register_forward_hook(after).remove)

    def remove(self, device: torch.device | None = None) -> None:
        """Take the hooks away and put every weight on `device` (default: home)."""
        for remover in reversed(self._removers):
            remover()
        self._removers.clear()
        for weights in self.weight_sets:
            weights.restore(device or self.home)
        self.active = None


def _remove_attribute(module: nn.Module, name: str) -> None:
    if name in vars(module):
        delattr(module, name)


def _layers(root: nn.Module, prefix: str = "") -> Iterable[tuple[str, nn.Module, bool]]:
    """(name, module, whole subtree?) for the units that sequential offload moves: atomic modules whole, others
    with their own direct parameters and buffers."""
    if isinstance(root, ATOMIC_MODULES):
        yield prefix, root, True
        return
    if _tensors_of(root, recurse=False):
        yield prefix, root, False
    for name, child in root.named_children():
        yield from _layers(child, f"{prefix}.{name}" if prefix else name)


def sub_models(model: nn.Module) -> dict[str, nn.Module]:
    """The separately offloadable parts: a LatentDiffusion's text encoder (SDXL's `conditioner`), UNet and
    autoencoder, or `model` itself."""
    parts = {"text encoder": getattr(model, "cond_stage_model", None) or getattr(model, "conditioner", None),
             "unet": getattr(getattr(model, "model", None), "diffusion_model", None),
             "autoencoder": getattr(model, "first_stage_model", None)}
    parts = {name: part for name, part in parts.items() if isinstance(part, nn.Module)}
    return parts or {"model": model}


def _check_device(model: nn.Module, device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if getattr(model, "_offload", None) is not None:
        raise ValueError("this model is already offloaded; call disable_offload(model) first")
    return device


def enable_model_offload(model: nn.Module, device: torch.device | str, home: torch.device | str = "cpu",
                         record: bool = False) -> Offload:
    """Keep each sub-model's weights at `home` and move it to `device` only while it runs (see module docstring)."""
    offload = Offload(_check_device(model, device), torch.device(home), record)
    for name, part in sub_models(model).items():
        weights = WeightSet(name, _tensors_of(part, recurse=True), offload.device, offload.home)
        offload.weight_sets.append(weights)
        offload.wrap_entry_points(part, functools.partial(offload.activate, weights))
    model._offload = offload
    return offload


def enable_sequential_offload(model: nn.Module, device: torch.device | str, home: torch.device | str = "cpu",
                              record: bool = False) -> Offload:
    """Stream the UNet's and the autoencoder's weights to `device` layer by layer; the text encoder moves whole."""
    offload = Offload(_check_device(model, device), torch.device(home), record)
    for name, part in sub_models(model).items():
        if name == "text encoder":
            weights = WeightSet(name, _tensors_of(part, recurse=True), offload.device, offload.home)
            offload.weight_sets.append(weights)
            offload.wrap_entry_points(part, functools.partial(offload.activate, weights))
        else:
            offload.stream_layers(name, part)
            offload.wrap_entry_points(part, functools.partial(_send_home, offload))
    model._offload = offload
    return offload


def _send_home(offload: Offload) -> None:
    """Before a streamed sub-model runs, the text encoder (if it was on the device) goes home."""
    if offload.active is not None:
        offload.active.to_home()
        offload.note(offload.active.name, "home")
        offload.active = None


def disable_offload(model: nn.Module, device: torch.device | str | None = None) -> None:
    """Remove the offload hooks; every weight goes to `device` (default: home)."""
    offload = getattr(model, "_offload", None)
    if offload is not None:
        offload.remove(torch.device(device) if device is not None else None)
        model._offload = None
