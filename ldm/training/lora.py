"""LoRA adapters for training (Hu et al. 2021), named as kohya's sd-scripts name them so other tools load the file.

Keys: `lora_unet_<module path under model.diffusion_model, dots as underscores>.lora_down.weight`, `.lora_up.weight`
and `.alpha`; `lora_te_<path under cond_stage_model.transformer>...` for the CLIP text encoder. As in kohya's default
network, the adapted layers are the linear layers and 1x1 convolutions inside the UNet's spatial transformers and the
text encoder's attention and MLP blocks. The base model is never modified: each adapter adds its output through a
forward hook, so the checkpoint keys of the base model stay as they are. `ldm.lora` merges a saved file at inference.
"""
from __future__ import annotations

import math
from typing import Iterator

import torch
from torch import nn

from ldm.lora import TEXT_ENCODER_PREFIX, UNET_PREFIX, kohya_name
from ldm.modules.attention import SpatialTransformer

TEXT_ENCODER_BLOCKS = ("CLIPAttention", "CLIPMLP")


class LoraAdapter(nn.Module):
    """The low-rank update of one layer: up(down(x)) * alpha / rank, zero at initialisation (up is zero)."""

    def __init__(self, layer: nn.Module, rank: int, alpha: float):
        super().__init__()
        if isinstance(layer, nn.Linear):
            self.lora_down = nn.Linear(layer.in_features, rank, bias=False)
            self.lora_up = nn.Linear(rank, layer.out_features, bias=False)
        elif isinstance(layer, nn.Conv2d) and layer.kernel_size == (1, 1):
            self.lora_down = nn.Conv2d(layer.in_channels, rank, 1, bias=False)
            self.lora_up = nn.Conv2d(rank, layer.out_channels, 1, bias=False)
        else:
            raise TypeError(f"LoRA adapts nn.Linear and 1x1 nn.Conv2d layers, not {layer}")
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_up.weight)
        self.rank = rank
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.to(layer.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_up(self.lora_down(x.to(self.lora_down.weight.dtype))) * (self.alpha / self.rank)


def _is_adaptable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1))


def unet_targets(unet: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(kohya name, layer) for the linear / 1x1 layers inside every SpatialTransformer of the UNet."""
    for block_name, block in unet.named_modules():
        if isinstance(block, SpatialTransformer):
            for name, layer in block.named_modules():
                if name and _is_adaptable(layer):
                    yield kohya_name(UNET_PREFIX, f"{block_name}.{name}"), layer


def text_encoder_targets(cond_stage_model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(kohya name, layer) for the linear layers of the CLIP text encoder's attention and MLP blocks."""
    transformer = getattr(cond_stage_model, "transformer", None)
    if transformer is None:
        raise ValueError(f"LoRA for the text encoder supports the CLIP text encoder of SD 1.x "
                         f"(cond_stage_model.transformer), not {type(cond_stage_model).__name__}: set "
                         "training.lora.text_encoder to false")
    for block_name, block in transformer.named_modules():
        if type(block).__name__ in TEXT_ENCODER_BLOCKS:
            for name, layer in block.named_modules():
                if name and isinstance(layer, nn.Linear):
                    yield kohya_name(TEXT_ENCODER_PREFIX, f"{block_name}.{name}"), layer


class LoraNetwork(nn.Module):
    """Adapters keyed by kohya module name; `state_dict()` keys are exactly the kohya file's keys."""

    def __init__(self, unet: nn.Module | None, cond_stage_model: nn.Module | None, rank: int,
                 alpha: float | None = None):
        super().__init__()
        alpha = float(rank if alpha is None else alpha)
        targets = []
        if unet is not None:
            targets += list(unet_targets(unet))
        if cond_stage_model is not None:
            targets += list(text_encoder_targets(cond_stage_model))
        if not targets:
            raise ValueError("the model has no layers LoRA can adapt (no spatial transformers / CLIP blocks)")
        self.adapters = nn.ModuleDict({name: LoraAdapter(layer, rank, alpha) for name, layer in targets})
        self.rank = rank
        self.alpha = alpha
        self._hooks = [layer.register_forward_hook(self._hook(name)) for name, layer in targets]

    def _hook(self, name: str):
        def add_update(layer: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
            return output + self.adapters[name](inputs[0]).to(output.dtype)
        return add_update

    def remove(self) -> None:
        """Detach the adapters from the base model (it computes as before they were attached)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def kohya_state_dict(self) -> dict[str, torch.Tensor]:
        """`lora_unet_....lora_down.weight` -> tensor, ... (the `adapters.` prefix removed)."""
        return {key.removeprefix("adapters."): value.detach() for key, value in self.state_dict().items()}

    def metadata(self) -> dict[str, str]:
        """The safetensors metadata kohya's tools write and read back (network module, rank, alpha)."""
        return {"ss_network_module": "networks.lora", "ss_network_dim": str(self.rank),
                "ss_network_alpha": str(self.alpha)}
