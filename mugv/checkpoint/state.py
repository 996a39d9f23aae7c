"""Training state each rank owns, as rectangular chunks of the layout-independent tensors.

Every parameter has one model-space tensor per kind of state: its weights (`model.<key>`),
fp32 EMA (`ema.<key>`), fp32 main copy and Adam moments (`optim.<state>.<key>`), keyed and
shaped like the full Megatron-layout parameter (see mugv.checkpoint.keys), so a checkpoint loads
at any TP/PP/CP/DP layout.

With Megatron's distributed optimizer each data-parallel rank (DP x CP) owns a contiguous range
[lo, hi) of the flattened local TP shard of each parameter: its slice of the fp32 main copy, of
the Adam moments and of the EMA. A flat range of an n-d shard is the union of at most 2n - 1
rectangles (`flat_chunks`); each becomes one ShardedTensor of the model-space tensor (uneven
sharding, written by this rank alone, its data a view of the live state: no copy). Megatron-Core
0.16.1 rejects `flattened_range` ShardedTensors and its own reshardable optimizer format is
wrong when a buffer has several buckets; rectangles of the slices computed here have neither
problem. Loading builds the same chunks at the new layout and reads straight into the live
state; DCP reads only the saved chunks that overlap them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from math import prod

import torch
from megatron.core.dist_checkpointing import ShardedTensor

OPTIM_STATES = ("param", "exp_avg", "exp_avg_sq")


@dataclass
class Slice:
    model_param: torch.nn.Parameter
    lo: int  # range of the flattened (local TP shard of the) model parameter this rank holds
    hi: int
    state: dict[str, torch.Tensor]  # flat views: "param" (fp32 main) and the optimizer moments
    sharded: bool  # True: no other DP rank holds this range (distributed optimizer)


def optimizers(optimizer) -> list:
    """The Megatron optimizers inside a (possibly chained) optimizer."""
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def prime_optimizer_state(optimizer) -> None:
    """Give every parameter of the torch Adam/AdamW optimizers inside `optimizer` its state (zeros,
    step 0) if it has none yet: torch creates it lazily at the first step, and a checkpoint is
    saved or loaded into it before then."""
    for opt in optimizers(optimizer):
        inner = getattr(opt, "optimizer", opt)
        if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                state = inner.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)


def optimizer_slices(optimizer) -> list[Slice]:
    """This rank's slice of every parameter the optimizer updates (moments included if the
    optimizer state exists: see prime_optimizer_state)."""
    out = []
    for opt in optimizers(optimizer):
        inner = getattr(opt, "optimizer", None)
        if hasattr(opt, "model_param_group_index_map"):  # DistributedOptimizer
            for p in opt.model_param_group_index_map:
                r = opt._get_model_param_range_map(p)["param"]
                out.append(Slice(p, r.start, r.end, _flat(opt._get_main_param_and_optimizer_states(p)), True))
        elif hasattr(opt, "float16_groups"):  # mixed precision, not distributed
            pairs = [pm for g in zip(opt.float16_groups, opt.fp32_from_float16_groups) for pm in zip(*g)]
            pairs += [(p, p) for g in opt.fp32_from_fp32_groups for p in g]
            out += [Slice(p, 0, p.numel(), _flat({"param": m, **inner.state.get(m, {})}), False) for p, m in pairs]
        else:  # fp32, not distributed: the model parameters are the main parameters
            for group in opt.param_groups:
                for p in group["params"]:
                    out.append(Slice(p, 0, p.numel(), _flat({"param": p.data, **inner.state.get(p, {})}), False))
    return out


def _flat(tensors: dict) -> dict[str, torch.Tensor]:
    return {k: v.view(-1) for k, v in tensors.items() if isinstance(v, torch.Tensor) and v.dim() > 0}


def flat_chunks(shape: tuple[int, ...], lo: int, hi: int) -> list[tuple[int, tuple, tuple]]:
    """Rectangles covering the flat range [lo, hi) of a C-contiguous tensor of `shape`, in order:
    (flat start, offset, size) each; at most 2 * len(shape) - 1 of them."""
    if lo >= hi:
        return []
    if len(shape) <= 1:
        return [(lo, (lo,), (hi - lo,))]
    inner = prod(shape[1:])
    (i0, r0), (i1, r1) = divmod(lo, inner), divmod(hi, inner)

    def row(i, a, b):  # part of row i: recurse into the trailing dims
        return [(i * inner + s, (i, *o), (1, *z)) for s, o, z in flat_chunks(shape[1:], a, b)]

    if i0 == i1:
        return row(i0, r0, r1)
    out = []
    if r0:
        out += row(i0, r0, inner)
        i0 += 1
    if i1 > i0:
        out.append((i0 * inner, (i0,) + (0,) * (len(shape) - 1), (i1 - i0, *shape[1:])))
    if r1:
        out += row(i1, 0, r1)
    return out


def state_tensors(model_sd: dict, slices: list[Slice], prefix: str, get: Callable[[Slice], torch.Tensor]) -> dict:
    """ShardedTensors `prefix + <global key>` of this rank's slices: each slice's flat values
    `get(slice)` (fp32, same range) cut into rectangles of the model-space tensor. Used to save
    (the data are views of the live state) and to load (read in place into those views)."""
    by_param: dict = {}
    for s in slices:
        by_param.setdefault(s.model_param, []).append(s)
    out = {}
    for entry, st in model_sd.items():
        name = prefix + entry.split(".", 1)[1]
        key = prefix + st.key.split(".", 1)[1]
        for s in by_param.get(st.data, []):
            values = get(s)
            replica = st.replica_id if not s.sharded else (*st.replica_id[:2], 0)
            for i, (start, offset, size) in enumerate(flat_chunks(tuple(st.local_shape), s.lo, s.hi)):
                data = values[start - s.lo : start - s.lo + prod(size)].view(size)
                out[f"{name}#{s.lo}.{i}"] = ShardedTensor(
                    key, data, torch.float32, size, tuple(st.global_shape),
                    tuple(g + o for g, o in zip(st.global_offset, offset)),
                    axis_fragmentations=None, replica_id=replica,
                )
    return out


def full_shards(model_sd: dict, prefix: str, dtype: torch.dtype = torch.float32) -> dict:
    """ShardedTensors `prefix + <global key>` of this rank's whole TP shards, empty (to load a
    state kind, e.g. the EMA, as weights)."""
    out = {}
    for entry, st in model_sd.items():
        key = prefix + st.key.split(".", 1)[1]
        data = torch.empty(st.data.shape, dtype=dtype, device=st.data.device)
        out[prefix + entry.split(".", 1)[1]] = replace(st, key=key, data=data, dtype=dtype)
    return out


@torch.no_grad()
def copy_loaded(template: dict, loaded: dict) -> None:
    """Copy what dist_checkpointing.load returned into the template's tensors where it did not
    load in place."""
    for name, st in template.items():
        got = loaded[name]
        if got.data_ptr() != st.data.data_ptr():
            st.data.copy_(got)
