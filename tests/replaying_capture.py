"""A graph capture for ldm.optimize.enable_graphs that runs anywhere, so CPU tests can check what replays see."""
from __future__ import annotations

from typing import Callable

import torch


class ReplayingCapture:
    """Each replay re-runs the captured call on the captured argument buffers and writes into the captured output, so
    that, as with a GPU graph, a replay sees only what was copied into those buffers."""

    def __init__(self) -> None:
        self.captures = 0

    def applies(self, tensors: list[torch.Tensor]) -> bool:
        return True

    def capture(self, function: Callable[[], torch.Tensor], warmup_calls: int) -> Callable[[], torch.Tensor]:
        for _ in range(warmup_calls):
            function()
        output = function()
        self.captures += 1

        def replay() -> torch.Tensor:
            output.copy_(function())
            return output
        return replay
