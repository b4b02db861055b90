"""Classifier-free guidance (Ho & Salimans 2022), shared by every sampler."""
from __future__ import annotations

from typing import Any

import torch

from ldm.modules.diffusionmodules.util import guidance_scale_embedding


def concat_conditionings(first: Any, second: Any) -> Any:
    """Stack two conditionings of the same structure along the batch: tensors, lists of them, or CompVis dicts
    like `{"c_crossattn": [tensor], "c_concat": [tensor]}`."""
    if torch.is_tensor(first) and torch.is_tensor(second):
        return torch.cat([first, second])
    if isinstance(first, dict) and isinstance(second, dict):
        if first.keys() != second.keys():
            raise ValueError(f"conditionings have different keys {sorted(first)} and {sorted(second)}; "
                             "give the unconditional conditioning the same keys as the conditional one")
        return {key: concat_conditionings(first[key], second[key]) for key in first}
    if isinstance(first, (list, tuple)) and isinstance(second, (list, tuple)):
        if len(first) != len(second):
            raise ValueError(f"conditioning lists have lengths {len(first)} and {len(second)}; they must match")
        return [concat_conditionings(a, b) for a, b in zip(first, second)]
    raise TypeError(f"cannot batch conditionings of types {type(first).__name__} and {type(second).__name__}; "
                    "expected tensors, lists of tensors or dicts of those with the same structure")


def conditioning_batch_size(cond: Any) -> int | None:
    """The batch size of the first tensor in a conditioning (tensor, list or dict of those); None if it has none."""
    if torch.is_tensor(cond):
        return cond.shape[0]
    children = cond.values() if isinstance(cond, dict) else cond if isinstance(cond, (list, tuple)) else ()
    for child in children:
        size = conditioning_batch_size(child)
        if size is not None:
            return size
    return None


def embedded_guidance_width(model: Any) -> int | None:
    """The width of the guidance embedding `model`'s UNet takes (a latent consistency model distilled with the
    guidance scale as an input, such as LCM_Dreamshaper); None for UNets guided the classifier-free way."""
    wrapper = getattr(model, "model", None)
    projection = getattr(getattr(wrapper, "diffusion_model", None), "time_cond_proj", None)
    return None if projection is None else projection.in_features


def with_embedded_guidance(cond: Any, scale: float, width: int) -> dict[str, Any]:
    """`cond` (the prompts' conditioning: SD's [B, T, C] text tensor, or SDXL's dict) with the guidance embedding of
    `scale` for such a UNet: w = scale - 1 embedded as its `timestep_cond` (diffusers' LatentConsistencyModel and
    SDXL pipelines: guidance_scale - 1), and no unconditional pass. For SD the CompVis dict
    `LatentDiffusion.apply_model` routes to the UNet, for SDXL sgm's dict with a "timestep_cond" entry."""
    text = cond["crossattn"] if isinstance(cond, dict) else cond
    w = torch.full((conditioning_batch_size(cond),), scale - 1.0, device=text.device)
    embedding = guidance_scale_embedding(w, width).to(text.dtype)
    if isinstance(cond, dict):
        return {**cond, "timestep_cond": embedding}
    return {"c_crossattn": [cond], "c_timestep": embedding}


def guided_model_output(model: Any, x: torch.Tensor, t: torch.Tensor, cond: Any, uncond: Any,
                        scale: float) -> torch.Tensor:
    """`model.apply_model` under classifier-free guidance: `uncond_out + scale * (cond_out - uncond_out)`.

    Both halves run in one `apply_model` call on the batch `[uncond, cond]`; with `scale == 1` or no `uncond` only the
    conditional half runs. The output is whatever the model predicts (eps or v): guidance is affine in it, so
    guiding before or after converting between the two gives the same result.
    """
    if uncond is None or scale == 1.0:
        return model.apply_model(x, t, cond)
    batched_x = torch.cat([x, x])  # [2B, C, H, W]: unconditional half first, as CompVis orders it
    batched_t = torch.cat([t, t])
    out_uncond, out_cond = model.apply_model(batched_x, batched_t, concat_conditionings(uncond, cond)).chunk(2)
    return out_uncond + scale * (out_cond - out_uncond)
