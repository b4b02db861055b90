"""ControlNet (Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion Models").

Classes and module names follow lllyasviel/ControlNet (`cldm.cldm.ControlNet`, `ControlLDM`, keys `input_hint_block.*`,
`input_blocks.*`, `zero_convs.*`, `middle_block.*`, `middle_block_out.*`), so its yaml configs and released weights
load unchanged. The trainable copy of the UNet encoder is built by `UNetModel` itself, not re-implemented here.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence, Union

import torch
from torch import nn

from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.modules.attention import Context
from ldm.modules.diffusionmodules.openaimodel import UNetModel, embed_timesteps_and_context
from ldm.modules.diffusionmodules.util import conv_nd, zero_module
from ldm.util import instantiate_from_config

HINT_DOWNSAMPLING = 8  # the hint encoder's three stride-2 convolutions: pixel resolution -> latent resolution


class ControlledUnetModel(UNetModel):
    """ControlNet's name for the UNet that adds control residuals to its skips; `UNetModel` takes `control` itself."""


def _zero_conv(dims: int, channels: int) -> nn.Sequential:
    # A one-child Sequential keeps the released key layout (`zero_convs.N.0.weight`).
    return nn.Sequential(zero_module(conv_nd(dims, channels, channels, 1, padding=0)))


class ControlNet(nn.Module):
    """A copy of the UNet's encoder and middle block, fed the latents plus an encoded hint image; each block's output
    passes through a zero-initialised 1x1 convolution and becomes a residual for the matching UNet skip connection.

    Takes the `control_stage_config.params` of the ControlNet yaml files: the UNet's encoder settings plus
    `hint_channels` (3 for RGB hint images).
    """

    def __init__(self, image_size: int | None, in_channels: int, model_channels: int, hint_channels: int,
                 dims: int = 2, **unet_kwargs: Any):
        """`unet_kwargs`: the base UNet's own keyword arguments (num_res_blocks, attention_resolutions, channel_mult,
        context_dim, ...; see `UNetModel`), under the same names as in the published cldm yaml files."""
        super().__init__()
        # The UNet's constructor builds the encoder exactly as the base model has it; its decoder is dropped (free
        # when loading, where parameters are built on the meta device).
        unet = UNetModel(image_size, in_channels, model_channels, in_channels, dims=dims, **unet_kwargs)
        self.in_channels = in_channels
        self.model_channels = model_channels
        self.hint_channels = hint_channels
        # ControlNet 1.1's shuffle model averages each residual over space; its yaml sets this on the ControlLDM.
        self.global_average_pooling = False
        self.time_embed = unet.time_embed
        self.input_hint_block = nn.Sequential(
            conv_nd(dims, hint_channels, 16, 3, padding=1), nn.SiLU(),
            conv_nd(dims, 16, 16, 3, padding=1), nn.SiLU(),
            conv_nd(dims, 16, 32, 3, padding=1, stride=2), nn.SiLU(),
            conv_nd(dims, 32, 32, 3, padding=1), nn.SiLU(),
            conv_nd(dims, 32, 96, 3, padding=1, stride=2), nn.SiLU(),
            conv_nd(dims, 96, 96, 3, padding=1), nn.SiLU(),
            conv_nd(dims, 96, 256, 3, padding=1, stride=2), nn.SiLU(),
            zero_module(conv_nd(dims, 256, model_channels, 3, padding=1)),
        )
        self.input_blocks = unet.input_blocks
        self.zero_convs = nn.ModuleList(_zero_conv(dims, ch) for ch in unet.input_block_channels)
        self.middle_block = unet.middle_block
        self.middle_block_out = _zero_conv(dims, unet.input_block_channels[-1])

    def forward(self, x: torch.Tensor, hint: torch.Tensor, timesteps: torch.Tensor,
                context: Context = None) -> list[torch.Tensor]:
        """x: [N, in_channels, h, w] latents, hint: [N, hint_channels, 8h, 8w] in [0, 1], timesteps: [N],
        context: [N, M, context_dim] -> len(input_blocks) + 1 residuals, one per UNet skip and one for the middle
        block, in the dtype of the weights."""
        if hint.shape[-2:] != (x.shape[-2] * HINT_DOWNSAMPLING, x.shape[-1] * HINT_DOWNSAMPLING):
            raise ValueError(f"the hint is {hint.shape[-1]}x{hint.shape[-2]} pixels but the latents are "
                             f"{x.shape[-1]}x{x.shape[-2]}: resize the control image to the output size "
                             f"{x.shape[-1] * HINT_DOWNSAMPLING}x{x.shape[-2] * HINT_DOWNSAMPLING}")
        dtype = self.time_embed[0].weight.dtype
        emb, context = embed_timesteps_and_context(self.time_embed, self.model_channels, timesteps, x.shape[0], context)
        guided_hint = self.input_hint_block(hint.to(dtype))
        residuals = []
        h = x.to(dtype)
        for index, (module, zero_conv) in enumerate(zip(self.input_blocks, self.zero_convs)):
            h = module(h, emb, context)
            if index == 0:  # the encoded hint joins the latents after the first convolution
                h = h + guided_hint
            residuals.append(zero_conv(h))
        h = self.middle_block(h, emb, context)
        residuals.append(self.middle_block_out(h))
        return residuals


def control_residuals(controlnet: ControlNet, x: torch.Tensor, hint: torch.Tensor, timesteps: torch.Tensor,
                      context: Context, scales: Union[float, Sequence[float]]) -> list[torch.Tensor]:
    """The ControlNet's residuals for a batch, each multiplied by its scale (a float for all, or one per residual).

    A hint with fewer images than the batch is repeated: a classifier-free guidance batch is [uncond; cond] of the
    same images, and ControlNet's scripts give the hint to both halves.
    """
    if x.shape[0] != hint.shape[0]:
        if x.shape[0] % hint.shape[0]:
            raise ValueError(f"{hint.shape[0]} hint images do not divide a batch of {x.shape[0]}: pass one hint or "
                             "one per image")
        hint = hint.repeat(x.shape[0] // hint.shape[0], *([1] * (hint.dim() - 1)))  # [n, C, H, W] -> [N, C, H, W]
    residuals = controlnet(x, hint, timesteps, context)
    if isinstance(scales, (int, float)):
        scales = [float(scales)] * len(residuals)
    if len(scales) != len(residuals):
        raise ValueError(f"{len(scales)} control scales for {len(residuals)} ControlNet residuals: pass one scale or "
                         f"{len(residuals)}")
    residuals = [residual * scale for residual, scale in zip(residuals, scales)]
    if controlnet.global_average_pooling:
        residuals = [residual.mean(dim=(2, 3), keepdim=True) for residual in residuals]  # [N, C, h, w] -> [N, C, 1, 1]
    return residuals


class ControlLDM(LatentDiffusion):
    """Stable Diffusion with a ControlNet beside its UNet, as `cldm_v15.yaml` describes it (`control_model.*` next to
    `model.diffusion_model.*`).

    `apply_model` takes ControlNet's conditioning `{"c_crossattn": [context], "c_concat": [hint] or None}`; plain text
    conditioning runs the UNet without control.
    """

    def __init__(self, control_stage_config: Mapping[str, Any], only_mid_control: bool = False,
                 global_average_pooling: bool = False, **kwargs: Any):
        super().__init__(**kwargs)
        self.control_model = instantiate_from_config(control_stage_config)
        self.control_model.global_average_pooling = global_average_pooling
        self.only_mid_control = only_mid_control
        self.control_scales = [1.0] * (len(self.control_model.zero_convs) + 1)

    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Any, return_ids: bool = False) -> torch.Tensor:
        if not isinstance(cond, dict) or not cond.get("c_concat"):
            if isinstance(cond, dict):
                cond = {key: value for key, value in cond.items() if key != "c_concat"}
            return super().apply_model(x_noisy, t, cond, return_ids)
        context = torch.cat(list(cond["c_crossattn"]), dim=1)
        hint = torch.cat(list(cond["c_concat"]), dim=1)
        control = control_residuals(self.control_model, x_noisy, hint, t, context, self.control_scales)
        if self.only_mid_control:  # the skips get nothing; only the middle block is steered
            control = [torch.zeros_like(residual) for residual in control[:-1]] + control[-1:]
        return self.model.diffusion_model(x_noisy, t, context=context, control=control)
