"""The module that holds the UNet as `diffusion_model` (checkpoint keys `model.diffusion_model.*`)."""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn

OPENAIUNETWRAPPER = "sgm.modules.diffusionmodules.wrappers.OpenAIWrapper"


class IdentityWrapper(nn.Module):
    """`compile_model` is accepted for sgm's signature; torch.compile is chosen at load time (--compile) here."""

    def __init__(self, diffusion_model: nn.Module, compile_model: bool = False):
        super().__init__()
        self.diffusion_model = diffusion_model

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.diffusion_model(*args, **kwargs)


class OpenAIWrapper(IdentityWrapper):
    """Routes sgm's conditioning dict to the UNet: "concat" joins the input channels, "crossattn" is the
    cross-attention context, "vector" the class/size embedding input `y`, "timestep_cond" a latent consistency
    model's guidance embedding (for UNets that take one)."""

    def forward(self, x: torch.Tensor, t: torch.Tensor, c: Mapping[str, torch.Tensor],
                **kwargs: Any) -> torch.Tensor:
        if c.get("concat") is not None:
            x = torch.cat((x, c["concat"]), dim=1)
        if c.get("timestep_cond") is not None:
            kwargs = {**kwargs, "timestep_cond": c["timestep_cond"]}
        return self.diffusion_model(x, timesteps=t, context=c.get("crossattn"), y=c.get("vector"), **kwargs)
