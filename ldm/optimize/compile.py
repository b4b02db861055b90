"""Graph-level speed options: torch.compile of the UNet and autoencoder decoder, and replayed GPU graphs.

Both pay a warm-up on the first call of each new shape (compilation, or capture), which callers time separately.
"""
from __future__ import annotations

import logging
from typing import Any

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


class GraphedUNet:
    """Replays the UNet's kernels from a captured accelerator graph for each input signature seen.

    The first call with a signature (shapes, dtypes, device of x, timesteps and context) warms up on a side
    stream and captures; later calls copy their inputs into the captured buffers and replay. Only for devices with
    graph capture (torch.cuda); elsewhere, and for other arguments (y, context lists), the UNet runs as usual.
    """

    def __init__(self, unet: UNetModel, warmup_calls: int = 2):
        self.unet = unet
        self.forward = unet.forward
        self.warmup_calls = warmup_calls
        self.graphs: dict[tuple, tuple[Any, list[torch.Tensor], torch.Tensor]] = {}

    def __call__(self, x: torch.Tensor, timesteps: torch.Tensor, context: Any = None, y: Any = None) -> torch.Tensor:
        if x.device.type != "cuda" or y is not None or not torch.is_tensor(context) or not torch.is_tensor(timesteps):
            return self.forward(x, timesteps, context, y)
        inputs = [x, timesteps, context]
        key = tuple((tuple(t.shape), t.dtype, t.device) for t in inputs)
        if key not in self.graphs:
            self.graphs[key] = self._capture(inputs)
        graph, static_inputs, static_output = self.graphs[key]
        for static, value in zip(static_inputs, inputs):
            static.copy_(value)
        graph.replay()
        return static_output.clone()

    def _capture(self, inputs: list[torch.Tensor]) -> tuple[Any, list[torch.Tensor], torch.Tensor]:
        accelerator = torch.cuda
        static_inputs = [tensor.clone() for tensor in inputs]
        side = accelerator.Stream()
        side.wait_stream(accelerator.current_stream())
        with accelerator.stream(side), torch.no_grad():
            for _ in range(self.warmup_calls):
                self.forward(*static_inputs)
        accelerator.current_stream().wait_stream(side)
        graph = accelerator.CUDAGraph()
        with accelerator.graph(graph), torch.no_grad():
            static_output = self.forward(*static_inputs)
        logger.info("captured a UNet graph for inputs %s", [tuple(t.shape) for t in inputs])
        return graph, static_inputs, static_output


def enable_graphs(model: nn.Module, warmup_calls: int = 2) -> int:
    """Capture and replay the UNet(s) of `model` per input shape (see `GraphedUNet`); returns how many.

    Weights must stay where they are (no offload), and the inputs' shapes fixed for the replay to pay off.
    """
    count = 0
    for module in model.modules():
        if isinstance(module, UNetModel) and "forward" not in vars(module):
            module.forward = GraphedUNet(module, warmup_calls)
            count += 1
    return count


def disable_graphs(model: nn.Module) -> None:
    for module in model.modules():
        if isinstance(vars(module).get("forward"), GraphedUNet):
            del module.forward
