"""generative-models' UNet signature over `ldm`'s UNetModel (the same modules and checkpoint keys).

sgm's UNet always uses spatial transformers with non-legacy head sizes and takes no `image_size`; its
`spatial_transformer_attn_type` chooses a kernel, which this package chooses itself (the weights are the same).
"""
from __future__ import annotations

from typing import Any, Sequence, Union

from ldm.modules.diffusionmodules import openaimodel

ATTENTION_TYPES = ("softmax", "softmax-xformers")


class UNetModel(openaimodel.UNetModel):
    """`ldm`'s UNet with sgm's fixed choices (spatial transformers, non-legacy head sizes, no image_size); every other
    keyword argument is `ldm.modules.diffusionmodules.openaimodel.UNetModel`'s, under the same name."""

    def __init__(self, *, context_dim: Union[int, Sequence[int], None] = None,
                 disable_middle_transformer: bool = False, spatial_transformer_attn_type: str = "softmax",
                 **unet_kwargs: Any):
        if context_dim is None:
            raise ValueError("this UNet needs context_dim (the width of the text embeddings): the sgm UNets without "
                             "cross-attention context are not supported")
        if disable_middle_transformer:
            raise ValueError("disable_middle_transformer=True (a UNet without a middle transformer) is not "
                             "supported; no released SDXL model uses it")
        if spatial_transformer_attn_type not in ATTENTION_TYPES:
            raise ValueError(f"spatial_transformer_attn_type {spatial_transformer_attn_type!r} is not one of "
                             f"{ATTENTION_TYPES}")
        super().__init__(image_size=None, use_spatial_transformer=True, legacy=False, context_dim=context_dim,
                         **unet_kwargs)
