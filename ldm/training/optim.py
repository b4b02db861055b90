"""Optimizer and learning-rate schedule shared by the training modules."""
from __future__ import annotations

import math
from typing import Iterable

import torch


def lr_factor(step: int, warmup_steps: int, total_steps: int | None, schedule: str, min_ratio: float) -> float:
    """Multiplier of the base learning rate at optimizer step `step`: linear warm-up, then constant or cosine."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant" or not total_steps or total_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / (total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(parameters: Iterable[torch.nn.Parameter], learning_rate: float, weight_decay: float,
                   warmup_steps: int, total_steps: int | None, schedule: str, min_ratio: float) -> dict:
    """AdamW plus a per-step LambdaLR, in the dict form Lightning's `configure_optimizers` returns."""
    parameters = [parameter for parameter in parameters if parameter.requires_grad]
    if not parameters:
        raise ValueError("nothing to train: every parameter is frozen")
    # fused: one kernel for all parameters instead of a dozen per tensor (CPU, CUDA and MPS have it)
    optimizer = torch.optim.AdamW(parameters, lr=learning_rate, weight_decay=weight_decay, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup_steps, total_steps, schedule, min_ratio))
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}
