"""Gradient finalisation for the Megatron MUGDiT (installed as config.finalize_model_grads_func).

After the backward passes of a global batch:
1. data-parallel reduction by Megatron's DDP (all-reduce, or reduce-scatter with the
   distributed optimizer), over DP x CP (CP ranks hold partial gradients of replicated params);
2. conditioning embedders, replicated on every pipeline chunk (`param.pipeline_parallel`), are
   summed over virtual chunks and the pipeline group. With the distributed optimizer a rank's
   reduce-scattered gradient is valid only in its own shard of each bucket, and those shards
   cover different parts of a parameter on different stages, so the valid parts are first made
   whole over DP (a masked all-reduce of these small parameters) before the pipeline sum;
3. parameters replicated over TP that see only part of the work -- this rank's sequence shard
   under sequence parallelism (`param.sequence_parallel`) or this rank's heads (QK-norm weights,
   `param.tp_partial_grad`) -- are summed over the TP group;
4. with `calculate_per_token_loss` (the DiT's setting: the loss function returns the sum of its
   micro-batch's per-sample losses and their count, Megatron sums gradients over micro-batches and
   DP x CP instead of averaging), every gradient is divided by the step's sample count: the count
   of the last pipeline stage, summed over DP (not CP: every CP rank counts the same samples, while
   each holds the gradient of its own token slice only). The step's loss is then the mean over
   all its samples, however they were split into micro-batches and ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


def _named_params(chunk):
    module = chunk.module if hasattr(chunk, "module") else chunk
    while hasattr(module, "module"):
        module = module.module
    return module.named_parameters()


def _all_reduce_(grads: list[torch.Tensor], group) -> None:
    if not grads:
        return
    flat = _flatten_dense_tensors(grads)
    dist.all_reduce(flat, group=group)
    for g, synced in zip(grads, _unflatten_dense_tensors(flat, grads)):
        g.copy_(synced)


def _dp_shard_mask(chunk, param, dp_rank: int, dp_size: int) -> torch.Tensor:
    """Bool mask over param's flattened grad: True where this DP rank's reduce-scattered shard is."""
    for buffer in getattr(chunk, "buffers", []):
        if param in buffer.param_index_map:
            start, end, bucket_id = buffer.param_index_map[param]  # in the buffer, padding included
            bucket = buffer.buckets[bucket_id]
            shard = bucket.grad_data.numel() // dp_size
            idx = torch.arange(start - bucket.offset, end - bucket.offset, device=bucket.grad_data.device)
            return (idx >= dp_rank * shard) & (idx < (dp_rank + 1) * shard)
    raise KeyError("parameter not found in any DDP grad buffer")


def _sum_pipeline_replicated(chunks, config) -> None:
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    if dist.get_world_size(pp_group) == 1 and len(chunks) == 1:
        return
    dp_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    dp_size = dist.get_world_size(dp_group)
    sharded = dp_size > 1 and getattr(chunks[0], "ddp_config", None) is not None and (
        chunks[0].ddp_config.use_distributed_optimizer
    )
    by_name: dict[str, list[torch.Tensor]] = {}
    dense: list[torch.Tensor] = []
    for chunk in chunks:
        for name, p in _named_params(chunk):
            if not (p.requires_grad and getattr(p, "pipeline_parallel", False)):
                continue
            g = p.main_grad
            if sharded:
                mask = _dp_shard_mask(chunk, p, dist.get_rank(dp_group), dp_size)
                g.view(-1).mul_(mask)
                dense.append(g)
            by_name.setdefault(name, []).append(g)
    _all_reduce_(dense, dp_group)
    firsts = []
    for grads in by_name.values():
        for g in grads[1:]:
            grads[0].add_(g)
        firsts.append(grads[0])
    _all_reduce_(firsts, pp_group)
    for grads in by_name.values():
        for g in grads[1:]:
            g.copy_(grads[0])


def _sum_tensor_parallel_partial(chunks, config) -> None:
    tp_group = parallel_state.get_tensor_model_parallel_group()
    if dist.get_world_size(tp_group) == 1:
        return
    grads = []
    for chunk in chunks:
        for _, p in _named_params(chunk):
            if not p.requires_grad:
                continue
            if (config.sequence_parallel and getattr(p, "sequence_parallel", False)) or getattr(
                p, "tp_partial_grad", False
            ):
                grads.append(p.main_grad)
    _all_reduce_(grads, tp_group)


def _divide_by_sample_count(chunks, num_samples: torch.Tensor) -> None:
    pp_group = parallel_state.get_pipeline_model_parallel_group()
    if dist.get_world_size(pp_group) > 1:  # only the last stage saw the loss
        dist.broadcast(num_samples, src=parallel_state.get_pipeline_model_parallel_last_rank(), group=pp_group)
    dp_group = parallel_state.get_data_parallel_group()
    if dist.get_world_size(dp_group) > 1:
        dist.all_reduce(num_samples, group=dp_group)
    n = int(num_samples)
    if n <= 0:
        raise RuntimeError(
            "calculate_per_token_loss is set but the step counted no samples: the loss function must "
            "return (sum of per-sample losses, sample count, report) -- see mugv.training.step.sample_mean_loss"
        )
    if n == 1:  # the sum is the mean: no pass over the gradient buffer
        return
    for chunk in chunks:
        if hasattr(chunk, "scale_gradients"):
            chunk.scale_gradients(1.0 / n)
        else:
            for _, p in _named_params(chunk):
                if p.requires_grad:
                    p.main_grad.mul_(1.0 / n)


def finalize_grads(model, num_tokens=None, pg_collection=None, force_all_reduce: bool = False) -> None:
    """Megatron finalize_model_grads_func for MUGDiT chunks (DDP-wrapped, or plain modules with
    `main_grad` set). num_tokens: the samples this rank's loss counted (with
    calculate_per_token_loss), else None (a loss that is already a mean)."""
    chunks = list(model)
    config = chunks[0].config
    for chunk in chunks:
        if hasattr(chunk, "finish_grad_sync"):
            chunk.finish_grad_sync(force_all_reduce=force_all_reduce)
    _sum_pipeline_replicated(chunks, config)
    _sum_tensor_parallel_partial(chunks, config)
    if num_tokens is not None:
        _divide_by_sample_count(chunks, num_tokens)
