"""Exponential moving average of the weights, in fp32, sharded like the optimizer state.

With Megatron's distributed optimizer each DP rank owns a slice of every parameter's fp32 main
copy; the EMA keeps exactly those slices (no full copy per rank while training) and is updated
from them after every applied step: ema = decay * ema + (1 - decay) * main. Checkpoints store it
in model space under `ema.<global key>` (the same keys and shapes as the weights, so any
layout can load it and `mugv convert --ema` can export it), gathering slices over DP only while
saving -- as Megatron does for the optimizer's fully reshardable format.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


@dataclass
class _Slice:
    model_param: torch.nn.Parameter
    main: torch.Tensor  # flat fp32 main-parameter slice the optimizer updates
    lo: int  # its range in the flattened model parameter
    hi: int


def _optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _slices(optimizer) -> list[_Slice]:
    out = []
    for opt in _optimizers(optimizer):
        if hasattr(opt, "model_param_group_index_map"):  # DistributedOptimizer
            for p in opt.model_param_group_index_map:
                r = opt._get_model_param_range_map(p)["param"]
                main = opt._get_main_param_and_optimizer_states(p)["param"]
                out.append(_Slice(p, main.view(-1), r.start, r.end))
        elif hasattr(opt, "float16_groups"):  # mixed precision, not distributed
            for model_g, main_g in zip(opt.float16_groups, opt.fp32_from_float16_groups):
                out += [_Slice(p, m.view(-1), 0, p.numel()) for p, m in zip(model_g, main_g)]
            for group in opt.fp32_from_fp32_groups:
                out += [_Slice(p, p.data.view(-1), 0, p.numel()) for p in group]
        else:  # fp32, not distributed: the model parameters are the main parameters
            for group in opt.param_groups:
                out += [_Slice(p, p.data.view(-1), 0, p.numel()) for p in group["params"]]
    return out


class ShardedEMA:
    def __init__(self, optimizer, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.slices = _slices(optimizer)
        self.shadow = [s.main.detach().float().clone() for s in self.slices]

    @torch.no_grad()
    def update(self) -> None:
        mains = [s.main.float() for s in self.slices]
        torch._foreach_mul_(self.shadow, self.decay)
        torch._foreach_add_(self.shadow, mains, alpha=1.0 - self.decay)

    def _full(self, params: list[torch.nn.Parameter], empty: bool = False) -> dict:
        """Model-space fp32 EMA of `params` (the same list, in the same order, on every DP rank):
        this rank's slices, summed over DP."""
        group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        full = {p: torch.zeros(p.numel(), dtype=torch.float32, device=p.device) for p in params}
        if not empty:
            for s, ema in zip(self.slices, self.shadow):
                full[s.model_param][s.lo : s.hi] = ema
            flat = list(full.values())
            if dist.get_world_size(group) > 1 and flat:
                buf = _flatten_dense_tensors(flat)
                dist.all_reduce(buf, group=group)
                for t, r in zip(flat, _unflatten_dense_tensors(buf, flat)):
                    t.copy_(r)
        return {p: t.view(p.shape) for p, t in full.items()}

    def sharded_state_dict(self, model_sharded: dict, is_loading: bool = False) -> dict:
        """`ema.*` ShardedTensors mirroring the model's (pass model_sharded_state_dict(...))."""
        full = self._full([st.data for st in model_sharded.values()], empty=is_loading)
        out = {}
        for entry, st in model_sharded.items():
            key = "ema." + st.key.split(".", 1)[1]
            out["ema." + entry.split(".", 1)[1]] = replace(st, key=key, data=full[st.data], dtype=torch.float32)
        return out

    @torch.no_grad()
    def load(self, loaded: dict, params_by_entry: dict) -> None:
        """Take this rank's slices from the model-space tensors dist_checkpointing returned.
        params_by_entry: model_sharded_state_dict entry -> its parameter (taken before loading:
        dist_checkpointing.load may rewrite the ShardedTensors it is given)."""
        by_param = {}
        for entry, param in params_by_entry.items():
            by_param[param] = loaded["ema." + entry.split(".", 1)[1]]
        for s, ema in zip(self.slices, self.shadow):
            ema.copy_(by_param[s.model_param].reshape(-1)[s.lo : s.hi].float())
