"""Graph-level speed options: torch.compile of the UNet and autoencoder decoder, and replayed GPU graphs.

Both pay a warm-up on the first call of each new shape (compilation, or capture), which callers time separately.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Hashable, Iterator, Protocol

import torch
from torch import nn

from ldm.modules.diffusionmodules.model import Decoder
from ldm.modules.diffusionmodules.openaimodel import UNetModel
from ldm.optimize.kernels import use_default_kernels

logger = logging.getLogger(__name__)


def compile_model(model: nn.Module, mode: str | None = None, backend: str = "inductor", dynamic: bool = False,
                  fullgraph: bool = False, freezing: bool | None = None) -> list[str]:
    """torch.compile every UNet and autoencoder decoder in `model`, in place (checkpoint keys unchanged).

    `mode`: torch.compile's mode (None, "max-autotune", "reduce-overhead", which also replays GPU graphs).
    `freezing` (default: when the weights are on the CPU): let inductor treat the weights as constants, which is
    what makes it pack them for oneDNN on the CPU; a process-wide inductor setting, for inference only (weights
    changed later are not seen). oneDNN layers go back to the default kernels first (the compiler packs weights
    itself). Compilation happens on the first call with each new shape. Returns the names of the compiled parts.
    """
    use_default_kernels(model)
    if freezing is None:
        freezing = next(model.parameters()).device.type == "cpu"
    if freezing and backend == "inductor":
        import torch._inductor.config as inductor_config
        inductor_config.freezing = True
    compiled = []
    for name, module in model.named_modules():
        if isinstance(module, (UNetModel, Decoder)):
            module.compile(mode=mode, backend=backend, dynamic=dynamic, fullgraph=fullgraph)
            compiled.append(name or type(module).__name__)
    if not compiled:
        raise ValueError(f"{type(model).__name__} holds no UNet or autoencoder decoder to compile")
    return compiled


class GraphCapture(Protocol):
    """How graphs are made and replayed, for `GraphedUNet`."""

    def applies(self, tensors: list[torch.Tensor]) -> bool:
        """Whether a call with these argument tensors can be captured."""

    def capture(self, function: Callable[[], torch.Tensor], warmup_calls: int) -> Callable[[], torch.Tensor]:
        """`function` captured; the returned callable replays it and returns its (reused) output tensor."""


class CudaGraphCapture:
    """Capture and replay with torch.cuda graphs: warm-up calls on a side stream, then one call captured."""

    def applies(self, tensors: list[torch.Tensor]) -> bool:
        return bool(tensors) and all(tensor.device.type == "cuda" for tensor in tensors)

    def capture(self, function: Callable[[], torch.Tensor], warmup_calls: int) -> Callable[[], torch.Tensor]:
        accelerator = torch.cuda
        side = accelerator.Stream()
        side.wait_stream(accelerator.current_stream())
        with accelerator.stream(side), torch.no_grad():
            for _ in range(warmup_calls):
                function()
        accelerator.current_stream().wait_stream(side)
        graph = accelerator.CUDAGraph()
        with accelerator.graph(graph), torch.no_grad():
            output = function()

        def replay() -> torch.Tensor:
            graph.replay()
            return output
        return replay


def _flatten(value: Any) -> tuple[list[torch.Tensor], Hashable] | None:
    """The tensors in `value` (tensors, None, and lists and tuples of them) and a hashable layout from which
    `_unflatten` rebuilds it around other tensors; None for anything else (a number would be fixed in the graph)."""
    if torch.is_tensor(value):
        return [value], "tensor"
    if value is None:
        return [], "none"
    if type(value) in (list, tuple):
        parts = [_flatten(item) for item in value]
        if any(part is None for part in parts):
            return None
        return [tensor for tensors, _ in parts for tensor in tensors], (type(value), tuple(part for _, part in parts))
    return None


def _unflatten(layout: Hashable, tensors: Iterator[torch.Tensor]) -> Any:
    if layout == "tensor":
        return next(tensors)
    if layout == "none":
        return None
    kind, parts = layout
    return kind(_unflatten(part, tensors) for part in parts)


class GraphedUNet:
    """A UNet's `graph_runner`: replays its computation from a captured accelerator graph for each signature of its
    arguments (x, timesteps, context, y, and ControlNet residuals: which are given, their shapes, dtypes, devices).
    Arguments other than tensors, lists of tensors and None (a number as timestep) run as usual.

    The first call with a signature warms up and captures; later calls copy their arguments into the captured
    buffers and replay. ControlNets attached with ldm.controlnet.attach_controlnet run before the UNet, and their
    residuals are among those arguments, so every replay uses the residuals of its own call. What the UNet reads
    besides its arguments (its weights) is fixed at capture. `capture` (default: CUDA graphs) decides where graphs
    apply and makes them; elsewhere the UNet computes as usual.
    """

    def __init__(self, warmup_calls: int = 2, capture: GraphCapture | None = None):
        self.warmup_calls = warmup_calls
        self.capture = capture if capture is not None else CudaGraphCapture()
        self.graphs: dict[Hashable, tuple[list[torch.Tensor], Callable[[], torch.Tensor]]] = {}

    def __call__(self, compute: Callable[..., torch.Tensor], *arguments: Any) -> torch.Tensor:
        flat = _flatten(arguments)
        if flat is None or not self.capture.applies(flat[0]):
            return compute(*arguments)
        tensors, layout = flat
        key = (layout, tuple((tuple(tensor.shape), tensor.dtype, tensor.device) for tensor in tensors))
        if key not in self.graphs:
            static = [tensor.clone() for tensor in tensors]
            replay = self.capture.capture(lambda: compute(*_unflatten(layout, iter(static))), self.warmup_calls)
            self.graphs[key] = static, replay
            logger.info("captured a UNet graph for inputs %s", [tuple(tensor.shape) for tensor in tensors])
        static, replay = self.graphs[key]
        for buffer, tensor in zip(static, tensors):
            buffer.copy_(tensor)
        return replay().clone()


def enable_graphs(model: nn.Module, warmup_calls: int = 2, capture: GraphCapture | None = None) -> int:
    """Capture and replay the UNet(s) of `model` per input signature (see `GraphedUNet`); returns how many.

    Weights must stay where they are (no offload), and the inputs' shapes fixed for the replay to pay off.
    `capture`: how graphs are made and replayed (default: CUDA graphs; tests pass one that runs anywhere).
    """
    count = 0
    for module in model.modules():
        if isinstance(module, UNetModel) and module.graph_runner is None:
            module.graph_runner = GraphedUNet(warmup_calls, capture)
            count += 1
    return count


def disable_graphs(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, UNetModel) and isinstance(module.graph_runner, GraphedUNet):
            module.graph_runner = None
