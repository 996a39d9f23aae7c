"""Per-rank slices of fp32 training state <-> model-space tensors, for checkpoints.

With Megatron's distributed optimizer every DP rank owns a contiguous slice of each parameter's
fp32 main copy and of its Adam moments. Checkpoints store such state in *model space*: one
tensor per parameter with the parameter's global key and TP sharding (see
mugv.models.megatron.checkpoint), so it loads at any TP/PP/CP/DP layout. Saving sums the slices
of the DP group onto its first rank (the one that writes), a parameter group at a time, on the
host; loading reads the model-space tensor and keeps this rank's slice. The optimizer state and
the EMA (mugv.training.ema) both go through here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

OPTIM_STATES = ("param", "exp_avg", "exp_avg_sq")
_GATHER_BYTES = 256 * 2**20


@dataclass
class Slice:
    model_param: torch.nn.Parameter
    lo: int  # range of the flattened model parameter this rank owns
    hi: int
    state: dict[str, torch.Tensor]  # flat views: "param" (fp32 main) and the optimizer moments


def _optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def optimizer_slices(optimizer) -> list[Slice]:
    """This rank's slices of every parameter the optimizer updates (moments included only if
    the optimizer state exists: see mugv.parallel.optim_state.prime_optimizer_state)."""
    out = []
    for opt in _optimizers(optimizer):
        inner = getattr(opt, "optimizer", None)
        if hasattr(opt, "model_param_group_index_map"):  # DistributedOptimizer
            for p in opt.model_param_group_index_map:
                r = opt._get_model_param_range_map(p)["param"]
                tensors = opt._get_main_param_and_optimizer_states(p)
                out.append(Slice(p, r.start, r.end, _flat(tensors)))
        elif hasattr(opt, "float16_groups"):  # mixed precision, not distributed
            pairs = [pm for g in zip(opt.float16_groups, opt.fp32_from_float16_groups) for pm in zip(*g)]
            pairs += [(p, p) for g in opt.fp32_from_fp32_groups for p in g]
            out += [Slice(p, 0, p.numel(), _flat({"param": m, **inner.state.get(m, {})})) for p, m in pairs]
        else:  # fp32, not distributed: the model parameters are the main parameters
            for group in opt.param_groups:
                for p in group["params"]:
                    out.append(Slice(p, 0, p.numel(), _flat({"param": p.data, **inner.state.get(p, {})})))
    return out


def _flat(tensors: dict) -> dict[str, torch.Tensor]:
    return {k: v.view(-1) for k, v in tensors.items() if isinstance(v, torch.Tensor) and v.dim() > 0}


def gather(model_sharded: dict, slices: list[Slice], get: Callable[[Slice], torch.Tensor]) -> dict:
    """Model-space fp32 CPU tensor per model parameter (keys: the parameters), exact on the first
    rank of each DP group (the writer); `get(slice)` gives the slice's flat values."""
    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    distributed = dist.is_initialized() and dist.get_world_size(group) > 1
    owner = dist.get_global_rank(group, 0) if distributed else 0
    by_param: dict = {}
    for s in slices:
        by_param.setdefault(s.model_param, []).append(s)
    params = [st.data for st in model_sharded.values()]
    out, batch, size = {}, [], 0
    for i, p in enumerate(params):
        batch.append(p)
        size += p.numel() * 4
        if size < _GATHER_BYTES and i + 1 < len(params):
            continue
        bufs = [torch.zeros(q.numel(), dtype=torch.float32, device=q.device) for q in batch]
        for q, buf in zip(batch, bufs):
            for s in by_param.get(q, []):
                buf[s.lo : s.hi] = get(s).float()
        if distributed:
            flat = _flatten_dense_tensors(bufs)
            dist.reduce(flat, dst=owner, group=group)
            bufs = _unflatten_dense_tensors(flat, bufs)
        out.update({q: b.view(q.shape).cpu() for q, b in zip(batch, bufs)})
        batch, size = [], 0
    return out


def sharded(model_sharded: dict, prefix: str, tensors: dict | None) -> dict:
    """ShardedTensors `prefix + key` mirroring the model's, holding `tensors[param]` (or empty
    fp32 CPU tensors to load into, when tensors is None)."""
    out = {}
    for entry, st in model_sharded.items():
        data = tensors[st.data] if tensors is not None else torch.empty(st.data.shape, dtype=torch.float32)
        key = prefix + st.key.split(".", 1)[1]
        out[prefix + entry.split(".", 1)[1]] = replace(st, key=key, data=data, dtype=torch.float32)
    return out


@torch.no_grad()
def scatter(loaded: dict, prefix: str, params_by_entry: dict, slices: list[Slice], put: Callable) -> None:
    """For every slice, put(slice, its values) from the loaded model-space tensors."""
    by_param = {p: loaded[prefix + entry.split(".", 1)[1]] for entry, p in params_by_entry.items()}
    for s in slices:
        full = by_param[s.model_param].reshape(-1)
        put(s, full[s.lo : s.hi].to(device=s.model_param.device))
