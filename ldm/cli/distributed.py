"""Runs under `torchrun`: which process this is, its device, and the few collective steps a bulk run needs.

PyTorch's own launcher starts the processes and sets RANK, WORLD_SIZE and LOCAL_RANK (and the rendezvous address);
this module only reads them and talks through `torch.distributed` (NCCL between CUDA processes, gloo otherwise).
Without torchrun (WORLD_SIZE unset or 1) everything here is a no-op.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

TIMEOUT = timedelta(hours=2)  # a rank waits this long for the others (a slow batch on another GPU, a model load)


@dataclass(frozen=True)
class World:
    """This process's place among the run's processes."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def broadcast(self, value: Any) -> Any:
        """Rank 0's `value`, on every rank."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: Any) -> list[Any]:
        """Every rank's `value`, in rank order, on every rank."""
        if not self.distributed:
            return [value]
        values: list[Any] = [None] * self.size
        dist.all_gather_object(values, value)
        return values

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def join_world(device: str | None) -> World:
    """This process's `World` from torchrun's environment, joined to the others (None device: CUDA processes when
    there is CUDA, else CPU processes)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World()
    world = World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))
    cuda = torch.cuda.is_available() and (device is None or device.startswith("cuda"))
    if cuda:
        torch.cuda.set_device(world.local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    return world


def rank_device(world: World, device: str | None) -> str | None:
    """The device of this rank: with CUDA and --device unset (or plain "cuda"), the GPU of its LOCAL_RANK."""
    if world.distributed and torch.cuda.is_available() and device in (None, "cuda"):
        return f"cuda:{world.local_rank}"
    return device
