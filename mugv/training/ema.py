"""Exponential moving average of the weights, in fp32, sharded like the optimizer state.

With Megatron's distributed optimizer each DP rank owns a slice of every parameter's fp32 main
copy; the EMA keeps exactly those slices (no full copy per rank while training) and is updated
from them after every applied step: ema = decay * ema + (1 - decay) * main. Checkpoints store it
in model space as `ema.<global key>` -- the weights' keys and shapes, so any layout can load it
and `mugv convert --ema` can export it (see mugv.training.model_space).
"""

from __future__ import annotations

import torch

from mugv.training import model_space


class ShardedEMA:
    PREFIX = "ema."

    def __init__(self, optimizer, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.slices = model_space.optimizer_slices(optimizer)
        self.shadow = [s.state["param"].detach().float().clone() for s in self.slices]

    @torch.no_grad()
    def update(self) -> None:
        mains = [s.state["param"].float() for s in self.slices]
        torch._foreach_mul_(self.shadow, self.decay)
        torch._foreach_add_(self.shadow, mains, alpha=1.0 - self.decay)

    def model_space(self, model_sharded: dict) -> dict:
        """{parameter: fp32 EMA in the parameter's shape} (exact on the first rank of each DP group)."""
        index = {id(s): i for i, s in enumerate(self.slices)}
        return model_space.gather(model_sharded, self.slices, lambda s: self.shadow[index[id(s)]])

    def sharded_state_dict(self, model_sharded: dict, is_loading: bool = False) -> dict:
        tensors = None if is_loading else self.model_space(model_sharded)
        return model_space.sharded(model_sharded, self.PREFIX, tensors)

    def load(self, loaded: dict, params_by_entry: dict) -> None:
        index = {id(s): i for i, s in enumerate(self.slices)}
        model_space.scatter(loaded, self.PREFIX, params_by_entry, self.slices,
                            lambda s, v: self.shadow[index[id(s)]].copy_(v))
