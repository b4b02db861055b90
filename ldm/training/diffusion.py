"""Training a `LatentDiffusion`: the denoising loss on frozen autoencoder latents, caption dropout for classifier-free
guidance, EMA, LoRA, and checkpoints in the released key layout.

The LightningModule holds the model as `ldm`; its checkpoints are rewritten on save to the keys of the released
files (`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.*`, the schedule buffers, and CompVis's
`model_ema.*` shadows), so the `.ckpt` a run writes is one `ldm.loading.load_model` reads. LoRA runs save only the
adapters, under kohya's key names.
"""
from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from typing import Any, Iterator, Mapping

import numpy as np
import torch

from ldm.checkpoints import read_checkpoint
from ldm.loading import check_keys, select_ema
from ldm.models.diffusion.noise import ImageNoise
from ldm.models.diffusion.samplers import sample
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.training.ema import LitEma
from ldm.training.export import cast_weights
from ldm.training.lightning import pl
from ldm.training.lora import LoraNetwork
from ldm.training.objectives import diffusion_loss, drop_captions
from ldm.training.optim import make_optimizer
from ldm.training.settings import TrainingSettings
from ldm.util import instantiate_from_config, to_plain

MODEL, EMA, LORA = "ldm.", "model_ema.", "lora.adapters."
VAE = "first_stage_model."


def load_first_stage_weights(autoencoder: torch.nn.Module, path: str | os.PathLike) -> None:
    """Autoencoder weights from `path`: a bare autoencoder file (CompVis VAE layout) or a full SD checkpoint."""
    state_dict, _ = read_checkpoint(path)
    if any(key.startswith(VAE) for key in state_dict):
        state_dict = {key[len(VAE):]: value for key, value in state_dict.items() if key.startswith(VAE)}
    state_dict = {key: value for key, value in state_dict.items() if not key.startswith(("loss.", EMA))}
    missing, unexpected = autoencoder.load_state_dict(state_dict, strict=False)
    if missing or unexpected:
        raise ValueError(f"first_stage_config ckpt_path {path} does not fit the autoencoder config: "
                         f"{len(missing)} missing (e.g. {missing[:2]}), {len(unexpected)} unexpected "
                         f"(e.g. {unexpected[:2]}); train the autoencoder with the same ddconfig first")


def load_initial_weights(model: torch.nn.Module, path: str | os.PathLike, use_ema: bool) -> None:
    """All weights of `model` from the checkpoint `path`, as strictly as `ldm.loading` loads them."""
    state_dict, _ = read_checkpoint(path)
    kept = check_keys(model, select_ema(state_dict, use_ema), f"the training config (init_from {path})")
    model.load_state_dict(kept, strict=False)  # only schedule buffers may be absent: they come from the config


def ema_key(name: str) -> str:
    """The name LitEma shadows parameter `name` (a LatentDiffusion parameter path) under: CompVis tracks the
    DiffusionWrapper `model`, so its parameters lose the `model.` prefix; a trained text encoder keeps its own."""
    return name[len("model."):] if name.startswith("model.") else name


class LatentDiffusionTraining(pl.LightningModule):
    """Trains the UNet of the `LatentDiffusion` built from `model_config` (the yaml `model` section).

    `model.params.cond_stage_trainable` trains the text encoder jointly; `training.lora` trains LoRA adapters
    instead of any base weight. The autoencoder is always frozen (train it first with its own config); its weights
    come from `first_stage_config.params.ckpt_path` when given.
    """

    def __init__(self, model_config: Mapping[str, Any], settings: TrainingSettings, learning_rate: float,
                 seed: int = 0):
        super().__init__()
        model_config = to_plain(model_config)
        params = model_config.get("params", {})
        self.settings = settings
        self.learning_rate = learning_rate
        self.ldm = instantiate_from_config(model_config)
        first_stage_ckpt = (params.get("first_stage_config", {}).get("params") or {}).get("ckpt_path")
        if first_stage_ckpt:
            load_first_stage_weights(self.ldm.first_stage_model, first_stage_ckpt)
        if settings.init_from:
            load_initial_weights(self.ldm, settings.init_from, settings.init_from_ema)
        self.ldm.requires_grad_(False)
        self.train_text_encoder = bool(params.get("cond_stage_trainable", False)) and settings.lora is None
        self.lora: LoraNetwork | None = None
        if settings.lora is not None:
            lora = settings.lora
            self.lora = LoraNetwork(self.ldm.model.diffusion_model if lora.unet else None,
                                    self.ldm.cond_stage_model if lora.text_encoder else None, lora.rank, lora.alpha)
        else:
            self.ldm.model.requires_grad_(True)
            if self.train_text_encoder:
                self.ldm.cond_stage_model.requires_grad_(True)
        self.model_ema = LitEma(self.ema_parameters(), settings.ema_decay) if settings.ema_decay else None
        self.generator = torch.Generator().manual_seed(seed)
        self.latent_cache: dict[int, torch.Tensor] = {}

    # --- parameters ------------------------------------------------------------------------------------------------
    def ema_parameters(self) -> dict[str, torch.nn.Parameter]:
        """The trained base parameters under their LitEma names."""
        return {ema_key(name): parameter for name, parameter in self.ldm.named_parameters()
                if parameter.requires_grad}

    def train(self, mode: bool = True) -> "LatentDiffusionTraining":
        super().train(mode)
        self.ldm.first_stage_model.eval()  # frozen parts stay in inference mode whatever Lightning asks
        if not self.train_text_encoder:
            self.ldm.cond_stage_model.eval()
        return self

    @contextmanager
    def ema_scope(self) -> Iterator[None]:
        """The EMA weights in place within the block (no-op without EMA)."""
        with (self.model_ema.average_parameters(self.ema_parameters()) if self.model_ema is not None
              else nullcontext()):
            yield

    # --- the objective ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def first_stage_latents(self, images: torch.Tensor, indices: torch.Tensor | None) -> torch.Tensor:
        """Scaled latents of `images`; with `cache_latents` each item's posterior is encoded once and kept."""
        if not self.settings.cache_latents or indices is None:
            posterior = self.ldm.encode_first_stage(images)
        else:
            keys = [int(index) for index in indices]
            missing = [row for row, key in enumerate(keys) if key not in self.latent_cache]
            if missing:
                encoded = self.ldm.encode_first_stage(images[missing])
                if not isinstance(encoded, DiagonalGaussianDistribution):
                    raise ValueError("training.cache_latents needs a KL autoencoder as first stage; set it to false")
                for row, moments in zip(missing, encoded.parameters):
                    self.latent_cache[keys[row]] = moments.to("cpu")
            moments = torch.stack([self.latent_cache[key] for key in keys]).to(images.device)  # [B, 2 * C, h, w]
            posterior = DiagonalGaussianDistribution(moments)
        return self.ldm.get_first_stage_encoding(posterior, generator=self.generator)

    def training_step(self, batch: Mapping[str, Any], batch_index: int) -> torch.Tensor:
        images = batch["image"].to(self.device)
        latents = self.first_stage_latents(images, batch.get("index"))
        captions = drop_captions(batch["caption"], self.settings.ucg_rate, self.generator)
        cond = self.ldm.get_learned_conditioning(captions)
        loss = diffusion_loss(self.ldm, latents, cond, self.generator, self.settings.snr_gamma)
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=len(captions))
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False,
                 batch_size=len(captions))
        return loss

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_index: int) -> None:
        if self.model_ema is not None:
            self.model_ema.update(self.ema_parameters())

    def configure_optimizers(self) -> dict:
        settings = self.settings
        parameters = self.lora.parameters() if self.lora is not None else self.ldm.parameters()
        total = self.trainer.max_steps if self.trainer is not None and self.trainer.max_steps > 0 else None
        return make_optimizer(parameters, self.learning_rate, settings.weight_decay, settings.lr_warmup_steps,
                              total, settings.lr_schedule, settings.lr_min_ratio)

    # --- checkpoints in the released layout --------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        released = {}
        for key, value in checkpoint["state_dict"].items():
            if key.startswith(MODEL):
                if self.lora is None:  # a LoRA run's base model is its init_from file, unchanged
                    released[key[len(MODEL):]] = value
            elif key.startswith(LORA):
                released[key[len(LORA):]] = value
            else:
                released[key] = value
        checkpoint["state_dict"] = released
        checkpoint["generator_state"] = self.generator.get_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        internal = {}
        for key, value in checkpoint["state_dict"].items():
            if key.startswith(EMA):
                internal[key] = value
            elif key.startswith(("lora_unet_", "lora_te_")):
                internal[LORA + key] = value
            else:
                internal[MODEL + key] = value
        if self.lora is not None:
            internal = {**{key: value for key, value in self.state_dict().items() if key.startswith(MODEL)},
                        **internal}
        checkpoint["state_dict"] = internal
        if "generator_state" in checkpoint:
            self.generator.set_state(checkpoint["generator_state"])

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """What a run ships: the full model in the released layout (EMA weights in place when `export_ema`), or for
        a LoRA run the kohya LoRA; floating weights in `export_dtype`."""
        if self.lora is not None:
            return cast_weights(self.lora.kohya_state_dict(), self.settings.export_dtype)
        scope = self.ema_scope() if self.settings.export_ema else nullcontext()
        with scope:
            state_dict = {key: value.detach().clone() for key, value in self.ldm.state_dict().items()}
        return cast_weights(state_dict, self.settings.export_dtype)

    def export_metadata(self) -> dict[str, str]:
        return self.lora.metadata() if self.lora is not None else {}

    # --- samples for watching a run --------------------------------------------------------------------------------
    @torch.no_grad()
    def sample_images(self, prompts: list[str], steps: int, scale: float, sampler: str, seed: int) -> np.ndarray:
        """uint8 images [N, H, W, 3] for `prompts` (EMA weights), one seed each: seed, seed + 1, ..."""
        was_training = self.training
        self.eval()
        try:
            with self.ema_scope():
                cond = self.ldm.get_learned_conditioning(prompts)
                uncond = self.ldm.get_learned_conditioning([""] * len(prompts))
                size = self.ldm.image_size
                shape = (len(prompts), self.ldm.channels, size, size)
                latents = sample(self.ldm, sampler, steps, shape, cond, uncond, scale,
                                 ImageNoise.from_seed(seed, len(prompts)), disable=True)
                images = self.ldm.decode_first_stage(latents)
        finally:
            self.train(was_training)
        pixels = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return pixels.permute(0, 2, 3, 1).cpu().numpy()  # [N, 3, H, W] -> [N, H, W, 3]
