"""Training the KL autoencoder (first stage) from scratch: reconstruction loss plus a small KL term.

CompVis adds a perceptual (LPIPS) loss and a patch discriminator; those need pretrained networks this package does
not download, so `lossconfig` here is `ReconstructionKLLoss` (L1 and/or L2 plus KL), enough for simple data such as
the shapes set. Checkpoints hold the autoencoder's own keys (`encoder.*`, `decoder.*`, `quant_conv.*`,
`post_quant_conv.*`), the layout of released VAE files, which `first_stage_config.params.ckpt_path` and `--vae` read.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
from torch import nn

from ldm.training.export import cast_weights
from ldm.training.lightning import pl
from ldm.training.optim import make_optimizer
from ldm.training.settings import TrainingSettings
from ldm.util import instantiate_from_config, to_plain

MODEL = "autoencoder."
LOSS_TARGET = "ldm.training.autoencoder.ReconstructionKLLoss"


class ReconstructionKLLoss(nn.Module):
    """l1_weight * |x - x'| + l2_weight * (x - x')^2 (means over pixels) + kl_weight * KL(q(z|x) || N(0, I))
    (summed over the latent, averaged over the batch, as CompVis weighs it)."""

    def __init__(self, kl_weight: float = 1e-6, l1_weight: float = 1.0, l2_weight: float = 0.0):
        super().__init__()
        if min(kl_weight, l1_weight, l2_weight) < 0 or l1_weight + l2_weight == 0:
            raise ValueError(f"loss weights must be >= 0 with some reconstruction term: kl_weight={kl_weight}, "
                             f"l1_weight={l1_weight}, l2_weight={l2_weight}")
        self.kl_weight = kl_weight
        self.l1_weight = l1_weight
        self.l2_weight = l2_weight

    def forward(self, inputs: torch.Tensor, reconstructions: torch.Tensor,
                posterior: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        difference = (reconstructions.float() - inputs.float())
        l1, l2 = difference.abs().mean(), difference.square().mean()
        kl = posterior.kl().mean()
        loss = self.l1_weight * l1 + self.l2_weight * l2 + self.kl_weight * kl
        return loss, {"l1": l1.detach(), "l2": l2.detach(), "kl": kl.detach()}


def build_loss(lossconfig: Mapping[str, Any] | None) -> ReconstructionKLLoss:
    """The loss a `lossconfig` names; only ReconstructionKLLoss is available."""
    if not lossconfig:
        return ReconstructionKLLoss()
    target = lossconfig.get("target")
    if target != LOSS_TARGET:
        raise ValueError(f"lossconfig target {target!r} cannot train an autoencoder here: use {LOSS_TARGET} "
                         "(LPIPS and the discriminator need pretrained networks this package does not download)")
    return ReconstructionKLLoss(**(lossconfig.get("params") or {}))


class AutoencoderTraining(pl.LightningModule):
    """Trains the `AutoencoderKL` of `model_config` (the yaml `model` section, target AutoencoderKL)."""

    def __init__(self, model_config: Mapping[str, Any], settings: TrainingSettings, learning_rate: float,
                 seed: int = 0):
        super().__init__()
        model_config = to_plain(model_config)
        if settings.ema_decay is not None or settings.lora is not None or settings.cache_latents:
            raise ValueError("autoencoder training supports neither training.ema_decay, training.lora nor "
                             "training.cache_latents: remove them from the config")
        self.settings = settings
        self.learning_rate = learning_rate
        self.autoencoder = instantiate_from_config(model_config)
        self.loss = build_loss((model_config.get("params") or {}).get("lossconfig"))
        self.generator = torch.Generator().manual_seed(seed)

    def training_step(self, batch: Mapping[str, Any], batch_index: int) -> torch.Tensor:
        images = batch["image"].to(self.device)
        posterior = self.autoencoder.encode(images)
        latents = posterior.sample(generator=self.generator)
        loss, parts = self.loss(images, self.autoencoder.decode(latents), posterior)
        batch_size = images.shape[0]
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=batch_size)
        for name, value in parts.items():
            self.log(f"train/{name}", value, on_step=True, on_epoch=False, batch_size=batch_size)
        # the diffusion stage multiplies latents by scale_factor = 1 / this, to give them unit variance
        self.log("train/latent_std", latents.detach().float().std(), prog_bar=True, on_step=True, on_epoch=False,
                 batch_size=batch_size)
        return loss

    def configure_optimizers(self) -> dict:
        settings = self.settings
        total = self.trainer.max_steps if self.trainer is not None and self.trainer.max_steps > 0 else None
        return make_optimizer(self.autoencoder.parameters(), self.learning_rate, settings.weight_decay,
                              settings.lr_warmup_steps, total, settings.lr_schedule, settings.lr_min_ratio)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {key[len(MODEL):]: value for key, value in checkpoint["state_dict"].items()
                                    if key.startswith(MODEL)}
        checkpoint["generator_state"] = self.generator.get_state()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = {MODEL + key: value for key, value in checkpoint["state_dict"].items()}
        if "generator_state" in checkpoint:
            self.generator.set_state(checkpoint["generator_state"])

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        state_dict = {key: value.detach().clone() for key, value in self.autoencoder.state_dict().items()}
        return cast_weights(state_dict, self.settings.export_dtype)

    def export_metadata(self) -> dict[str, str]:
        return {}

    @torch.no_grad()
    def sample_images(self, images: torch.Tensor) -> np.ndarray:
        """Inputs above their reconstructions (posterior means), uint8 [2N, H, W, 3]."""
        was_training = self.training
        self.eval()
        try:
            images = images.to(self.device)
            reconstructions = self.autoencoder.decode(self.autoencoder.encode(images).mode())
        finally:
            self.train(was_training)
        pixels = ((torch.cat([images, reconstructions]).float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return pixels.permute(0, 2, 3, 1).cpu().numpy()  # [2N, 3, H, W] -> [2N, H, W, 3]
