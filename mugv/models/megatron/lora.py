"""LoRA on the Megatron linears of the MUGDiT layer, sharded like their base layer under TP.

    spec = get_layer_spec("local", lora=LoRASettings(rank=64, alpha=32))
    chunks = build_model_chunks(config, spec)
    prepare_lora(chunks, seed)          # base frozen; adapters initialised, the same at any layout

A LoRA linear is its base class (Megatron's Column/RowParallelLinear or Transformer Engine's)
with two more parameters, so the base weights keep their names and checkpoint keys:
y = base(x) + scale * B A dropout(x), scale = alpha / rank. Under tensor parallelism:

  column-parallel base (W split by output rows): A [r, in] replicated, B [out/tp, r] split like W.
      h = A x on this rank's tokens; under sequence parallelism the r-wide h is all-gathered over
      the sequence (not the C-wide x), else it enters the TP region by copy (grad all-reduced).
  row-parallel base (W split by input columns): A [r, in/tp] split like W, B [out, r] replicated.
      h = A x_tp is a partial sum: reduce-scattered over the sequence under sequence
      parallelism, else all-reduced; B h is added to the base output.

Under sequence parallelism the replicated factor (A of a column target, B of a row target) sees
only this rank's tokens: it is tagged `sequence_parallel`, so mugv.parallel.grads sums its
gradient over TP. The split factor carries Megatron's tensor-parallel attributes (counted once
per shard in the grad norm). Frozen base linears run Megatron's frozen-weight path (no weight
gradient, their input is not kept).

Dropout (lora.dropout) draws from Megatron's RNG: the default stream where x is replicated over TP
(column target without SP), the tensor-parallel tracker elsewhere. Those streams are not
checkpointed, so a resumed run's masks differ, and `full` recompute (which replays the forward
without restoring them) is refused with dropout by the config.

For a LoRA reference model (DPO): `with adapters_disabled(model): ...` runs the base network
alone through the same modules (no copy, no parameter added); `has_lora(model)` tells whether a
model has adapters. Both take a model chunk or a list of chunks, wrapped or not.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import parallel_state, tensor_parallel
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.spec_utils import ModuleSpec
from torch import nn

from mugv.models.megatron.weight_map import LORA_TARGETS

COLUMN, ROW = "column", "row"


@dataclass(frozen=True)
class LoRASettings:
    """Adapter shape of every targeted linear (targets: names of LORA_TARGETS)."""

    rank: int
    alpha: float
    dropout: float = 0.0
    targets: tuple[str, ...] = tuple(LORA_TARGETS)

    def __post_init__(self):
        unknown = sorted(set(self.targets) - set(LORA_TARGETS))
        if unknown or self.rank < 1 or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"bad LoRA settings {self}: rank >= 1, dropout in [0, 1), targets in {list(LORA_TARGETS)}")


class LoRALinear:
    """Mixin put in front of a Megatron / TE linear class by `lora_linear` (see the module doc)."""

    lora_parallel = COLUMN

    def __init__(self, input_size: int, output_size: int, *, config, lora_rank: int, lora_alpha: float,
                 lora_dropout: float = 0.0, **kwargs):
        if kwargs.get("gather_output") or kwargs.get("input_is_parallel") is False:
            raise NotImplementedError("LoRA linears take a TP-split output (column) / input (row), as the MUGDiT layer")
        super().__init__(input_size, output_size, config=config, **kwargs)
        tp = config.tensor_model_parallel_size
        self.lora_in, self.lora_rank, self.lora_tp = input_size, lora_rank, tp
        self.lora_scale, self.lora_dropout = lora_alpha / lora_rank, lora_dropout
        self.lora_sp = bool(config.sequence_parallel) and tp > 1
        self.lora_disabled = False
        w = self.weight
        column = self.lora_parallel == COLUMN
        a_shape = (lora_rank, input_size if column else input_size // tp)  # [r, in] or [r, in/tp]
        b_shape = (output_size // tp if column else output_size, lora_rank)  # [out/tp, r] or [out, r]
        self.lora_A = nn.Parameter(torch.empty(a_shape, dtype=w.dtype, device=w.device))
        self.lora_B = nn.Parameter(torch.zeros(b_shape, dtype=w.dtype, device=w.device))
        split, replicated = (self.lora_B, self.lora_A) if column else (self.lora_A, self.lora_B)
        set_tensor_model_parallel_attributes(split, True, 0 if column else 1, 1)
        replicated.sequence_parallel = self.lora_sp  # sees this rank's tokens only: summed over TP
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # prepare_lora re-draws it layout-independently

    @torch.no_grad()
    def reset_adapter(self, generator: torch.Generator, tp_rank: int) -> None:
        """A ~ U(-1/sqrt(in), 1/sqrt(in)) drawn whole (model space) and cut to this rank's shard; B = 0."""
        bound = 1.0 / math.sqrt(self.lora_in)
        full = (torch.rand(self.lora_rank, self.lora_in, generator=generator, dtype=torch.float64) * 2 - 1) * bound
        if self.lora_parallel == ROW:
            w = self.lora_in // self.lora_tp
            full = full[:, tp_rank * w : (tp_rank + 1) * w]
        self.lora_A.copy_(full)
        self.lora_B.zero_()

    def _dropout(self, x: torch.Tensor) -> torch.Tensor:
        if not self.lora_dropout or not self.training:
            return x
        replicated = self.lora_parallel == COLUMN and not self.lora_sp  # the same x on every TP rank
        with nullcontext() if replicated else tensor_parallel.get_cuda_rng_tracker().fork():
            return F.dropout(x, self.lora_dropout, training=True)

    def lora_delta(self, x: torch.Tensor) -> torch.Tensor:
        """scale * B A x, laid out like the base output."""
        h = F.linear(self._dropout(x), self.lora_A)  # [n_loc, B, r] (column) / partial [n, B, r] (row)
        if self.lora_tp > 1:
            if self.lora_parallel == COLUMN:
                h = gather_from_sequence_parallel_region(h) if self.lora_sp else copy_to_tensor_model_parallel_region(h)
            else:
                h = reduce_scatter_to_sequence_parallel_region(h) if self.lora_sp else reduce_from_tensor_model_parallel_region(h)
        return F.linear(h, self.lora_B) * self.lora_scale  # [n, B, out/tp] (column) / [n_loc, B, out] (row)

    def forward(self, x, *args, **kwargs):
        out, bias = super().forward(x, *args, **kwargs)
        if self.lora_disabled:
            return out, bias
        return out + self.lora_delta(x), bias


@functools.cache
def lora_linear(base: type, parallel: str) -> type:
    """`base` (a Megatron / TE linear class) with a LoRA adapter; parallel: 'column' or 'row'."""
    if parallel not in (COLUMN, ROW):
        raise ValueError(f"parallel must be {COLUMN!r} or {ROW!r}, got {parallel!r}")
    return type(f"LoRA{base.__name__}", (LoRALinear, base), {"lora_parallel": parallel, "__module__": __name__})


def lora_spec(base: type, parallel: str, target: str, lora: LoRASettings | None):
    """The ModuleSpec of one linear of the layer: `base` itself, or its LoRA class if targeted."""
    if lora is None or target not in lora.targets:
        return base
    params = dict(lora_rank=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout)
    return ModuleSpec(module=lora_linear(base, parallel), params=params)


def _unwrap(module):
    while hasattr(module, "module"):
        module = module.module
    return module


def _chunks(model) -> list:
    return list(model) if isinstance(model, (list, tuple)) else [model]


def lora_modules(model) -> Iterator[LoRALinear]:
    for chunk in _chunks(model):
        for m in chunk.modules():
            if isinstance(m, LoRALinear):
                yield m


def has_lora(model) -> bool:
    """Whether a model (chunk or list of chunks, wrapped in DDP / Float16Module or not) has adapters."""
    return next(lora_modules(model), None) is not None


@contextmanager
def adapters_disabled(model):
    """Inside: the forward runs the base network only (the adapters are skipped, nothing is copied
    or added). A forward with grad must run its backward inside too (recompute replays it)."""
    mods = list(lora_modules(model))
    before = [m.lora_disabled for m in mods]
    for m in mods:
        m.lora_disabled = True
    try:
        yield
    finally:
        for m, b in zip(mods, before):
            m.lora_disabled = b


def lora_targets(chunk) -> tuple[str, ...]:
    """The LORA_TARGETS names adapted in a (wrapped or not) MUGDiTMegatron chunk."""
    layers = _unwrap(chunk).layers
    if not len(layers):
        return ()
    return tuple(t for t, (_, meg, _) in LORA_TARGETS.items() if isinstance(layers[0].get_submodule(meg), LoRALinear))


def adapter_parameters(model) -> list[nn.Parameter]:
    return [p for m in lora_modules(model) for p in (m.lora_A, m.lora_B)]


def _require_grad(module, args, out):
    """Keep the token embeddings in the autograd graph although the embedder is frozen: a reentrant
    (full) recompute of a layer gives gradients only if one of its inputs requires them."""
    return out.requires_grad_() if torch.is_grad_enabled() and not out.requires_grad else out


def prepare_lora(chunks, seed: int) -> None:
    """Freeze every base parameter and initialise the adapters: A drawn from a generator seeded by
    (seed, global layer, target) and cut to this rank's shard -- the same model-space values at
    any TP/PP layout -- and B = 0, so training starts from the base model's output exactly."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    for chunk in chunks:
        m = _unwrap(chunk)
        adapters = {id(p) for p in adapter_parameters(m)}
        for p in m.parameters():
            p.requires_grad_(id(p) in adapters)
        for j, layer in enumerate(m.layers):
            for k, (_, meg, _) in enumerate(LORA_TARGETS.values()):
                lin = layer.get_submodule(meg)
                if isinstance(lin, LoRALinear):
                    g = torch.Generator().manual_seed((seed * 1_000_003 + (m.layer_offset + j) * 101 + k) % 2**63)
                    lin.reset_adapter(g, tp_rank)
        if getattr(m, "pre_process", False) and not getattr(m, "_lora_hooked", False):
            m.x_embedder.register_forward_hook(_require_grad)
            m._lora_hooked = True
