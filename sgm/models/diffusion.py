"""`DiffusionEngine`: an SDXL checkpoint (base, refiner, turbo) behind the CompVis `LatentDiffusion` interface.

The parts carry the released checkpoints' key names: `model.diffusion_model.*` (UNet inside sgm's wrapper),
`conditioner.embedders.N.*` (text encoders; size and score embedders have no weights), `first_stage_model.*`
(autoencoder) and `denoiser.*` (a schedule recomputed from the config). The discrete denoiser's schedule and
scaling become the CompVis schedule buffers and `parameterization`, so every sampler of
`ldm.models.diffusion.samplers` runs on it unchanged. Conditioning is sgm's dict, batched along dim 0 by the
samplers' classifier-free guidance: {"crossattn": [B, 77, context], "vector": [B, adm_in_channels]}.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from ldm.models.diffusion.ddpm import LatentDiffusion
from ldm.util import get_obj_from_str, instantiate_from_config
from sgm.modules import UNCONDITIONAL_CONFIG
from sgm.modules.diffusionmodules.discretizer import LegacyDDPMDiscretization
from sgm.modules.diffusionmodules.wrappers import OPENAIUNETWRAPPER

Size = Sequence[int]  # (height, width) in pixels, as SDXL was trained: height first
DEFAULT_SIZE = (1024, 1024)  # the resolution SDXL base and refiner were trained at
TEXT_KEY = "txt"  # the batch entry the text embedders read
REFINER_KEY = "aesthetic_score"  # read by the refiner's conditioner only
AESTHETIC_SCORES = {"positive": 6.0, "negative": 2.5}  # diffusers' aesthetic_score defaults for the refiner


class DiffusionEngine(LatentDiffusion):
    """SDXL for inference, built from the `params` of generative-models' `sd_xl_base.yaml` / `sd_xl_refiner.yaml`.

    `sampler_config` is accepted and not built: sampling is chosen per run among this package's samplers, which
    cover generative-models' Euler/Heun/DPM++ samplers and guiders. `force_zeros_for_empty_prompt`: an empty
    negative prompt becomes zero text embeddings, as diffusers' and sgm's SDXL base pipelines do; None decides by
    the model: on unless its conditioner reads an aesthetic score (the refiner, which both encode "" for).
    """

    def __init__(self, network_config: Mapping[str, Any], denoiser_config: Mapping[str, Any],
                 first_stage_config: Mapping[str, Any], conditioner_config: Mapping[str, Any] | None = None,
                 sampler_config: Mapping[str, Any] | None = None, network_wrapper: str | None = None,
                 use_ema: bool = False, scale_factor: float = 1.0,
                 force_zeros_for_empty_prompt: bool | None = None):
        nn.Module.__init__(self)  # LatentDiffusion's parts come from CompVis configs; these from sgm's
        self.model = get_obj_from_str(network_wrapper or OPENAIUNETWRAPPER)(instantiate_from_config(network_config))
        self.denoiser = instantiate_from_config(denoiser_config)
        self.conditioner = instantiate_from_config(conditioner_config or UNCONDITIONAL_CONFIG)
        self.first_stage_model = instantiate_from_config(first_stage_config).eval()
        self.sampler_config = sampler_config
        self.scale_factor = scale_factor
        # EMA weights are copied into `model` when the checkpoint is loaded (ldm.loading), so no shadow copy is kept
        self.use_ema = use_ema
        self.channels = self.model.diffusion_model.in_channels
        self.clip_denoised, self.v_posterior = False, 0.0
        self.parameterization = self._parameterization(self.denoiser)
        discretization = getattr(self.denoiser, "discretization", None)
        if not isinstance(discretization, LegacyDDPMDiscretization):
            raise ValueError(f"denoiser_config needs a discrete DDPM schedule (LegacyDDPMDiscretization) for this "
                             f"package's samplers, got {type(discretization).__name__}")
        self.register_schedule(beta_schedule="linear", timesteps=discretization.num_timesteps,
                               linear_start=discretization.linear_start, linear_end=discretization.linear_end)
        if force_zeros_for_empty_prompt is None:
            force_zeros_for_empty_prompt = REFINER_KEY not in self.conditioner.input_keys
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt

    @staticmethod
    def _parameterization(denoiser: nn.Module) -> str:
        scaling = getattr(denoiser, "scaling", None)
        parameterization = getattr(scaling, "parameterization", None)
        if parameterization is None:
            raise ValueError(f"denoiser scaling {type(scaling).__name__} has no discrete-time equivalent: use "
                             "EpsScaling or VScaling (what the released SDXL and SD 2.x models use)")
        return parameterization

    @property
    def cond_stage_model(self) -> nn.Module:
        """The text encoders, under the name CompVis-style tools (offloading, memory reports) look for."""
        return self.conditioner

    # --- conditioning ---------------------------------------------------------------------------------------------
    def conditioning_batch(self, prompts: Sequence[str], original_size: Size | None = None,
                           crop_coords_top_left: Size = (0, 0), target_size: Size | None = None,
                           aesthetic_score: float = AESTHETIC_SCORES["positive"]) -> dict[str, Any]:
        """sgm's batch dict for `prompts`: the sizes default as diffusers' do, original = target = the size
        (default 1024 x 1024), crop (0, 0)."""
        target_size = tuple(target_size or DEFAULT_SIZE)
        original_size = tuple(original_size or target_size)
        for name, value in (("original_size", original_size), ("crop_coords_top_left", crop_coords_top_left),
                            ("target_size", target_size)):
            if len(value) != 2:
                raise ValueError(f"{name} {value} must be (height, width)")
        count = len(prompts)

        def rows(value: Sequence[float]) -> torch.Tensor:
            return torch.tensor([list(value)] * count, dtype=torch.float32, device=self.device)

        return {TEXT_KEY: list(prompts), "original_size_as_tuple": rows(original_size),
                "crop_coords_top_left": rows(crop_coords_top_left), "target_size_as_tuple": rows(target_size),
                REFINER_KEY: rows([aesthetic_score])[:, 0]}

    def get_learned_conditioning(self, c: str | Sequence[str] | Mapping[str, Any],
                                 run_embedder: Callable[..., Any] | None = None, **size_kwargs: Any
                                 ) -> dict[str, torch.Tensor]:
        """Prompts (or an sgm batch dict) to {"crossattn", "vector"}; `size_kwargs` are `conditioning_batch`'s
        original_size, crop_coords_top_left, target_size (height, width) and aesthetic_score (refiner);
        `run_embedder` goes to the conditioner (prompt weighting)."""
        if isinstance(c, Mapping):
            return self.conditioner(c, run_embedder=run_embedder)
        prompts = [c] if isinstance(c, str) else list(c)
        return self.conditioner(self.conditioning_batch(prompts, **size_kwargs), run_embedder=run_embedder)

    def get_unconditional_conditioning(self, negative_prompts: str | Sequence[str],
                                       run_embedder: Callable[..., Any] | None = None, **size_kwargs: Any
                                       ) -> dict[str, torch.Tensor]:
        """The negative half of classifier-free guidance. With `force_zeros_for_empty_prompt`, the text part of an
        empty negative prompt is zeros (cross-attention context and pooled embedding; the sizes stay), as in
        diffusers' StableDiffusionXLPipeline without a negative prompt. The refiner's score defaults to 2.5."""
        prompts = [negative_prompts] if isinstance(negative_prompts, str) else list(negative_prompts)
        size_kwargs.setdefault("aesthetic_score", AESTHETIC_SCORES["negative"])
        batch = self.conditioning_batch(prompts, **size_kwargs)
        empty = torch.tensor([prompt == "" for prompt in prompts], device=self.device)
        if not self.force_zeros_for_empty_prompt or not empty.any():
            return self.conditioner(batch, run_embedder=run_embedder)
        zeroed = self.conditioner(batch, force_zero_embeddings=[TEXT_KEY], run_embedder=run_embedder)
        if empty.all():
            return zeroed
        encoded = self.conditioner(batch, run_embedder=run_embedder)
        return {key: torch.where(empty.reshape(-1, *[1] * (value.ndim - 1)), zeroed[key], value)
                for key, value in encoded.items()}

    # --- denoiser -------------------------------------------------------------------------------------------------
    def apply_model(self, x_noisy: torch.Tensor, t: torch.Tensor, cond: Mapping[str, torch.Tensor],
                    return_ids: bool = False) -> torch.Tensor:
        """The UNet's prediction (eps or v, per `parameterization`) for latents `x_noisy` at timesteps `t`."""
        if not isinstance(cond, Mapping):
            raise TypeError(f"SDXL conditioning is the dict get_learned_conditioning returns ({{'crossattn', "
                            f"'vector'}}), got {type(cond).__name__}")
        return self.model(x_noisy, t, cond)
