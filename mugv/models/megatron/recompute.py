"""Selective activation recompute: keep the tensors whose recompute costs matrix multiplies, and
recompute in backward the cheap, memory-heavy ones (LayerNorm + modulation, QK-norm + RoPE, GELU,
layout copies).

Inside `SelectiveRecompute()` (a saved-tensor hook over one layer's forward):

    x = cheap(fn, *inputs)      # fn elementwise: keeps only `inputs`; x is not kept by anyone
    o = reuse(o_copy, fn, base) # o_copy = fn(base) with no saved state (a layout copy)

`cheap` runs fn without recording its graph and keeps its inputs (its backward re-runs fn with
grad, like a reentrant checkpoint); and any later op that saves x (the Linear that consumes it,
the attention core) gets a recipe instead -- fn(*inputs) re-run under no_grad on unpack -- so
x's memory is freed after the forward. Tensors that are kept go on to the hooks that were
active outside (saved-tensor hooks nest; only the innermost pair runs, so this one forwards to
the outer pair itself): a memory probe or CPU offload around the layer sees what is really kept.

Outside a `SelectiveRecompute` context `cheap(fn, ...)` is `fn(...)`, except where `always` is
set (QK-norm + RoPE keeps its bf16 input only in every mode).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
from torch.utils.checkpoint import checkpoint

_state = threading.local()


def _active() -> SelectiveRecompute | None:
    stack = getattr(_state, "stack", None)
    return stack[-1] if stack else None


def _outer_hooks():
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top(False) if top is not None else None


class _Recipe:
    """How to rebuild a saved tensor: base = fn(*inputs) (inputs packed by the outer hooks), then
    the saved view of base."""

    __slots__ = ("fn", "inputs", "unpack", "size", "stride", "offset")

    def __init__(self, fn, inputs, unpack, view: torch.Tensor):
        self.fn, self.inputs, self.unpack = fn, inputs, unpack
        self.size, self.stride, self.offset = view.size(), view.stride(), view.storage_offset()

    def build(self) -> torch.Tensor:
        args = [self.unpack(i) if self.unpack is not None else i for i in self.inputs]
        with torch.no_grad():
            base = self.fn(*args)
        return base.as_strided(self.size, self.stride, self.offset)


class SelectiveRecompute:
    """Saved-tensor policy of one layer's forward (see the module docstring)."""

    def __init__(self):
        self.recipes: dict[int, tuple[torch.Tensor, Callable, tuple]] = {}  # storage ptr -> (base, fn, inputs)

    def __enter__(self) -> SelectiveRecompute:
        outer = _outer_hooks()
        self.outer_pack, self.outer_unpack = outer if outer is not None else (None, None)
        self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self.hooks.__enter__()
        _state.stack = [*getattr(_state, "stack", []), self]
        return self

    def __exit__(self, *exc) -> None:
        _state.stack.pop()
        self.hooks.__exit__(*exc)
        self.recipes.clear()

    def _keep(self, t: torch.Tensor):
        return self.outer_pack(t) if self.outer_pack is not None else t

    def _pack(self, t: torch.Tensor):
        entry = self.recipes.get(t.untyped_storage().data_ptr()) if t.numel() else None
        if entry is not None and entry[0].untyped_storage().nbytes() == t.untyped_storage().nbytes():
            _, fn, inputs = entry
            return _Recipe(fn, [self._keep(i) for i in inputs], self.outer_unpack, t)
        return ("kept", self._keep(t))

    def _unpack(self, packed):
        if isinstance(packed, _Recipe):
            return packed.build()
        t = packed[1]
        return self.outer_unpack(t) if self.outer_unpack is not None else t

    def register(self, base: torch.Tensor, fn: Callable, inputs: tuple) -> None:
        """Any later save of (a view of) `base` becomes the recipe fn(*inputs)."""
        self.recipes[base.untyped_storage().data_ptr()] = (base, fn, tuple(inputs))


def cheap(fn: Callable, *inputs: torch.Tensor, always: bool = False):
    """fn(*inputs) for an elementwise fn (one tensor or a tuple of tensors out), keeping only its
    inputs when a SelectiveRecompute is active (or `always`) and grad is on."""
    policy = _active()
    if not torch.is_grad_enabled() or (policy is None and not always):
        return fn(*inputs)
    if any(t.requires_grad for t in inputs):
        out = checkpoint(fn, *inputs, use_reentrant=True, preserve_rng_state=False)
    else:
        out = fn(*inputs)
    if policy is not None:
        for k, o in enumerate(out if isinstance(out, tuple) else (out,)):
            pick = (lambda *a, k=k: fn(*a)[k]) if isinstance(out, tuple) else fn
            policy.register(o, pick, inputs)
    return out


def reuse(copy: torch.Tensor, fn: Callable, *inputs: torch.Tensor) -> torch.Tensor:
    """Declare `copy` = fn(*inputs) (a layout copy whose own backward keeps nothing): under a
    SelectiveRecompute, whoever saves it keeps the inputs instead."""
    policy = _active()
    if policy is not None and torch.is_grad_enabled():
        policy.register(copy, fn, inputs)
    return copy
