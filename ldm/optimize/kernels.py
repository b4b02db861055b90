"""Speed options that change how the weights are laid out or which library multiplies them, never what they are:
fused projections, channels-last activations, and oneDNN kernels on the CPU (convolution weights packed once,
matrix products with the bias in the same pass).

Each function works on a loaded model in place, keeps every checkpoint key and value (`state_dict()` is unchanged),
and is safe to call on any module tree: it touches only the layers it knows. The oneDNN kernels are layers of their
own types (`PackedConv2d`, `OneDNNLinear`) put in place of the plain ones in their parents, holding the same
Parameters; torch's classes and the layers' classes are never changed.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import nn

from ldm.checkpoints import PageReleaser
from ldm.modules.attention import CrossAttention, linear, onednn_linear_available
from ldm.modules.diffusionmodules.model import AttnBlock, Decoder, Encoder
from ldm.modules.diffusionmodules.openaimodel import UNetModel

logger = logging.getLogger(__name__)


def _stack_in_place(layers: list[nn.Module], releaser: PageReleaser) -> None:
    """Copy the weights (and biases) of `layers` back to back into one tensor and make each layer's parameter a view
    of its slice; the old tensors' mapped checkpoint pages are given back."""
    for name in ("weight", "bias"):
        tensors = [getattr(layer, name) for layer in layers]
        if any(tensor is None for tensor in tensors):
            continue
        joined = torch.cat([tensor.detach().reshape(tensor.shape[0], -1) for tensor in tensors])
        start = 0
        for layer, old in zip(layers, tensors):
            rows = old.shape[0]
            view = joined[start:start + rows].view(old.shape)
            setattr(layer, name, nn.Parameter(view, requires_grad=old.requires_grad))
            start += rows
            releaser.release(old)


def fuse_projections(model: nn.Module) -> int:
    """Lay out the query/key/value projections of every attention back to back, so each attention runs one matrix
    product instead of three (two for cross-attention). Returns the number of attentions fused.

    The parameters become views of one tensor; their keys, shapes and values do not change. Call it after the model
    is on its device and dtype: moving or converting it afterwards separates the views again, and the attentions
    then simply run unfused.
    """
    releaser = PageReleaser()
    fused = 0
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, CrossAttention):
                same_input = module.to_q.in_features == module.to_k.in_features
                _stack_in_place([module.to_q, module.to_k, module.to_v] if same_input else [module.to_k, module.to_v],
                                releaser)
                fused += 1
            elif isinstance(module, AttnBlock):
                _stack_in_place([module.q, module.k, module.v], releaser)
                fused += 1
    return fused


def channels_last(model: nn.Module, enabled: bool = True) -> int:
    """Run the UNet's and the autoencoder's activations in channels-last layout (NHWC in memory).

    Convolutions on the CPU and on recent GPUs prefer it, and it turns the transformer's pixel <-> token reshapes
    into free views. Convolution weights are converted too unless they are packed (`use_onednn_kernels`, which
    chooses its own layout). Returns the number of networks switched.
    """
    switched = 0
    for module in model.modules():
        if isinstance(module, (UNetModel, Encoder, Decoder)):
            module.channels_last = enabled
            switched += 1
    layout = torch.channels_last if enabled else torch.contiguous_format
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Conv2d) and not isinstance(module, PackedConv2d):
                module.weight.data = module.weight.data.contiguous(memory_format=layout)
    return switched


def onednn_available() -> bool:
    """Whether this PyTorch has the oneDNN (mkldnn) convolution ops that `use_onednn_kernels` uses."""
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")
    except (AttributeError, RuntimeError):
        return False


class PackedConv2d(nn.Conv2d):
    """An `nn.Conv2d` whose weight is also kept in oneDNN's blocked layout, packed once.

    Eager PyTorch reorders a convolution's weight into that layout on every CPU call (for a 1280x1280x3x3 layer,
    59 MB copied into fresh memory per call); packing once removes that. 1x1 convolutions on channels-last input
    run as matrix products on the pixel rows instead. Whenever the packed weight cannot be used (input not on the
    CPU, dtypes differ, gradients wanted, the weight changed since packing), the layer runs as a plain Conv2d.
    """

    def pack(self) -> None:
        with torch.no_grad():
            weight = self.weight.detach()
            self._packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
                weight.to_mkldnn(), list(self.padding), list(self.stride), list(self.dilation), self.groups, None)
            self._packed_for = self._weight_signature()

    def runs_as_matrix_product(self) -> bool:
        return (self.kernel_size == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0) and self.groups == 1
                and self.dilation == (1, 1))

    def _weight_signature(self) -> tuple:
        return self.weight.data_ptr(), self.weight._version, self.weight.dtype, self.weight.device

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type != "cpu" or x.dtype != self.weight.dtype
                or (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))):
            return super().forward(x)
        if self.runs_as_matrix_product() and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            rows = linear(x.permute(0, 2, 3, 1), self.weight.flatten(1), self.bias)  # [N, H, W, C_out]
            return rows.permute(0, 3, 1, 2)
        if self.__dict__.get("_packed_for") != self._weight_signature():
            return super().forward(x)
        return torch.ops.mkldnn._convolution_pointwise(
            x, self._packed, self.bias, list(self.padding), list(self.stride), list(self.dilation), self.groups,
            "none", [], "")


class OneDNNLinear(nn.Linear):
    """An `nn.Linear` that multiplies with oneDNN on the CPU (`ldm.modules.attention.linear`); elsewhere as usual."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def conv_like(conv: nn.Conv2d, kind: type[nn.Conv2d]) -> nn.Conv2d:
    """A `kind` convolution with `conv`'s settings holding `conv`'s own weight and bias Parameters."""
    layer = kind(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                 dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                 padding_mode=conv.padding_mode, device="meta")  # meta: nothing allocated or initialised
    layer.weight, layer.bias = conv.weight, conv.bias
    return layer.train(conv.training)


def linear_like(layer: nn.Linear, kind: type[nn.Linear]) -> nn.Linear:
    """A `kind` linear layer holding `layer`'s own weight and bias Parameters."""
    replacement = kind(layer.in_features, layer.out_features, bias=layer.bias is not None, device="meta")
    replacement.weight, replacement.bias = layer.weight, layer.bias
    return replacement.train(layer.training)


def has_hooks(module: nn.Module) -> bool:
    """Whether hooks are registered on `module` itself (they belong to that object: it is not replaced)."""
    return any(getattr(module, name, None) for name in (
        "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks", "_state_dict_hooks",
        "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks"))


def replace_layers(model: nn.Module, replacement: Callable[[nn.Module], nn.Module | None]) -> int:
    """Put `replacement(layer)` in place of each leaf layer of `model` below its root for which it is not None, in
    every parent that holds the layer (checkpoint keys stay: the names do not change). Layers with hooks stay as they
    are. Returns the number of layers replaced."""
    chosen: dict[nn.Module, nn.Module | None] = {}
    for path, layer in list(model.named_modules(remove_duplicate=False)):  # every place of a shared layer
        if not path:
            continue
        if layer not in chosen:
            chosen[layer] = replacement(layer)
            if chosen[layer] is not None and has_hooks(layer):
                logger.info("%s keeps its kernel: it has hooks registered on it", path)
                chosen[layer] = None
        if chosen[layer] is not None:
            parent, _, name = path.rpartition(".")
            setattr(model.get_submodule(parent), name, chosen[layer])
    return sum(layer is not None for layer in chosen.values())


def use_onednn_kernels(model: nn.Module) -> int:
    """Run the CPU float32/bfloat16 convolutions and linear layers of `model` with oneDNN: convolution weights are
    packed once (`PackedConv2d`), linear layers use oneDNN's matrix product (`OneDNNLinear`).

    The new layers take the place of the plain ones in their parents and hold the same Parameters (checkpoint keys
    and values unchanged); they fall back to the plain computation wherever oneDNN does not apply. Packed copies
    replace the convolution weights in memory: the weights' memory-mapped checkpoint pages are given back (they
    re-read from the file if the plain weights are ever used). 1x1 convolutions are not packed: on channels-last
    input they run as matrix products on their plain weights. Layers already packed are packed again (for weights
    changed since). `model` itself is not replaced, only the layers below it. Returns the number of layers that
    run with oneDNN; 0 when this PyTorch has no oneDNN.
    """
    if not onednn_available():
        logger.info("oneDNN is not available in this PyTorch: the default kernels stay")
        return 0
    releaser = PageReleaser()
    linear_available = onednn_linear_available()

    def on_cpu(layer: nn.Module) -> bool:
        weight = layer.weight
        return weight is not None and weight.device.type == "cpu" and weight.dtype in (torch.float32, torch.bfloat16)

    def onednn_layer(layer: nn.Module) -> nn.Module | None:
        if type(layer) is nn.Conv2d and layer.padding_mode == "zeros" and on_cpu(layer):
            return conv_like(layer, PackedConv2d)
        if type(layer) is nn.Linear and linear_available and on_cpu(layer):
            return linear_like(layer, OneDNNLinear)
        return None

    replace_layers(model, onednn_layer)
    switched = 0
    for module in model.modules():
        if isinstance(module, (PackedConv2d, OneDNNLinear)) and on_cpu(module):
            if isinstance(module, PackedConv2d) and not module.runs_as_matrix_product():
                module.pack()
                releaser.release(module.weight)
            switched += 1
    return switched


def use_default_kernels(model: nn.Module) -> int:
    """Undo `use_onednn_kernels`: plain Conv2d and Linear layers again (holding the same Parameters), packed copies
    freed."""
    def default_layer(layer: nn.Module) -> nn.Module | None:
        if isinstance(layer, PackedConv2d):
            return conv_like(layer, nn.Conv2d)
        if isinstance(layer, OneDNNLinear):
            return linear_like(layer, nn.Linear)
        return None

    return replace_layers(model, default_layer)


def apply_fast_paths(model: nn.Module, device: torch.device | str | None = None, *, fuse: bool = True,
                     layout: bool | None = None, onednn: bool | None = None) -> list[str]:
    """The default speed options for `device` (default: where the model's parameters are); returns what was applied.

    `fuse`: fused attention projections (every device). `layout`: channels-last activations (default: on the CPU,
    where it measured faster; elsewhere off until measured). `onednn`: oneDNN kernels (default: on the CPU).
    Outputs match the plain path to float rounding (tests/test_performance.py).
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    on_cpu = device.type == "cpu"
    applied = []
    if fuse and fuse_projections(model):
        applied.append("fused attention projections")
    if (on_cpu if onednn is None else onednn) and use_onednn_kernels(model):
        applied.append("oneDNN kernels")
    if (on_cpu if layout is None else layout) and channels_last(model):
        applied.append("channels-last activations")
    return applied


__all__ = ["fuse_projections", "channels_last", "use_onednn_kernels", "use_default_kernels", "apply_fast_paths",
           "PackedConv2d", "OneDNNLinear", "onednn_available"]
