"""Exponential moving average of the weights, in fp32, sharded like the optimizer state.

With Megatron's distributed optimizer each DP rank owns a slice of every parameter's fp32 main
copy; the EMA keeps exactly those slices (no full copy per rank while training) and is updated
from them after every applied step: ema = decay * ema + (1 - decay) * main. Checkpoints store it
as `ema.<global key>` -- the weights' keys and shapes -- each rank writing its own slices (see
mugv.checkpoint.state), so any layout can load it and `mugv convert --ema` can export it.
"""

from __future__ import annotations

import torch

from mugv.checkpoint.state import optimizer_slices, state_tensors


class ShardedEMA:
    PREFIX = "ema."

    def __init__(self, optimizer, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.slices = optimizer_slices(optimizer)
        self.shadow = [s.state["param"].detach().float().clone() for s in self.slices]
        self._index = {id(s): i for i, s in enumerate(self.slices)}

    @torch.no_grad()
    def update(self) -> None:
        mains = [s.state["param"].float() for s in self.slices]
        torch._foreach_mul_(self.shadow, self.decay)
        torch._foreach_add_(self.shadow, mains, alpha=1.0 - self.decay)

    def state_tensors(self, model_sharded: dict) -> dict:
        """ShardedTensors `ema.<key>` of this rank's slices (views: saved from, loaded into in place)."""
        return state_tensors(model_sharded, self.slices, self.PREFIX, lambda s: self.shadow[self._index[id(s)]])

    @torch.no_grad()
    def swap_into_main_params(self) -> None:
        """Exchange the EMA and the optimizer's fp32 main parameters in place (call twice to undo):
        previews sample with the EMA weights without a second copy of the model."""
        for s, shadow in zip(self.slices, self.shadow):
            main = s.state["param"]
            for a in range(0, main.numel(), 1 << 22):  # a bounded temporary
                tmp = main[a : a + (1 << 22)].clone()
                main[a : a + (1 << 22)].copy_(shadow[a : a + (1 << 22)])
                shadow[a : a + (1 << 22)].copy_(tmp)
