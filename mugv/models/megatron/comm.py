"""Differentiable collectives over the context-parallel (or any) group, sequence-first tensors.

gather_seq:  [n, ...] per rank -> [n * world, ...] (rank order); backward reduce-scatters the
             gradient (default), or just takes this rank's slice when every rank computes the
             same downstream loss (grad="slice").
seq_to_heads / heads_to_seq: Ulysses all-to-all, [n, B, h, D] sequence-sharded <->
             [n * world, B, h / world, D] head-sharded.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _all_gather(x: torch.Tensor, group) -> torch.Tensor:
    world = dist.get_world_size(group)
    out = torch.empty((world * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.all_gather_into_tensor(out, x.contiguous(), group=group)
    return out


def _reduce_scatter(x: torch.Tensor, group) -> torch.Tensor:
    world = dist.get_world_size(group)
    out = torch.empty((x.shape[0] // world, *x.shape[1:]), dtype=x.dtype, device=x.device)
    dist.reduce_scatter_tensor(out, x.contiguous(), group=group)
    return out


class _GatherSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, slice_grad):
        ctx.group, ctx.slice_grad = group, slice_grad
        return _all_gather(x, group)

    @staticmethod
    def backward(ctx, g):
        if ctx.slice_grad:
            n = g.shape[0] // dist.get_world_size(ctx.group)
            return g.narrow(0, dist.get_rank(ctx.group) * n, n).contiguous(), None, None
        return _reduce_scatter(g, ctx.group), None, None


def gather_seq(x: torch.Tensor, group, grad: str = "reduce_scatter") -> torch.Tensor:
    if group is None or dist.get_world_size(group) == 1:
        return x
    return _GatherSeq.apply(x, group, grad == "slice")


def _a2a_seq_to_heads(x: torch.Tensor, group) -> torch.Tensor:
    world = dist.get_world_size(group)
    n, B, h, D = x.shape
    send = x.reshape(n, B, world, h // world, D).permute(2, 0, 1, 3, 4).contiguous()  # [world, n, B, h/w, D]
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[r] = rank r's sequence chunk, my heads
    return recv.reshape(world * n, B, h // world, D)


def _a2a_heads_to_seq(x: torch.Tensor, group) -> torch.Tensor:
    world = dist.get_world_size(group)
    N, B, hl, D = x.shape
    send = x.reshape(world, N // world, B, hl, D).contiguous()  # [world, n, B, h/w, D]
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[r] = my sequence chunk, rank r's heads
    return recv.permute(1, 2, 0, 3, 4).reshape(N // world, B, world * hl, D)


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _a2a_seq_to_heads(x, group)

    @staticmethod
    def backward(ctx, g):
        return _a2a_heads_to_seq(g, ctx.group), None


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _a2a_heads_to_seq(x, group)

    @staticmethod
    def backward(ctx, g):
        return _a2a_seq_to_heads(g, ctx.group), None


def seq_to_heads(x: torch.Tensor, group) -> torch.Tensor:
    return _SeqToHeads.apply(x, group)


def heads_to_seq(x: torch.Tensor, group) -> torch.Tensor:
    return _HeadsToSeq.apply(x, group)
