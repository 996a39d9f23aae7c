"""Optimizer-state helpers for loading Megatron-Core distributed checkpoints without TE/Apex.

Without TransformerEngine or Apex, Megatron-Core's optimizers wrap ``torch.optim.Adam``, whose
per-parameter state (step, exp_avg, exp_avg_sq) is created lazily on the first step.
``DistributedOptimizer.sharded_state_dict(..., is_loading=True)`` reads that state to build the
load template (it asserts a single common ``step``), so a freshly built optimizer cannot be
loaded into. :func:`prime_optimizer_state` allocates that state (zeros, step 0) so the template
can be built; every value is then overwritten by the load. Fused TE/Apex optimizers keep
``step`` in the param groups and need nothing; for them (and SGD) this is a no-op.

Second gap, same configuration (megatron-core 0.16.1): ``DistributedOptimizer.load_state_dict``
restores torch Adam's ``step`` from the param groups, but its
``_set_main_param_and_optimizer_states`` then copies every key of the live state (``step``
included) from the loaded per-parameter tensors, which deliberately omit ``step``: KeyError.
:func:`load_optimizer_state_dict` runs ``optimizer.load_state_dict`` with that copy skipping a
missing ``step`` (the value already restored from the param groups is kept). The override is an
instance attribute that exists only during the call.

Third gap: that restore puts ONE step tensor object into every parameter's state; torch Adam
increments each parameter's step in place, so after the next step the shared counter has
advanced once per parameter and bias correction is wrong from then on.
:func:`load_optimizer_state_dict` gives every parameter its own copy afterwards.
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager

import torch


def _inner_torch_optimizers(optimizer) -> list[torch.optim.Optimizer]:
    """The torch optimizers inside a Megatron optimizer (chained or not)."""
    chained = getattr(optimizer, "chained_optimizers", None)
    wrappers = chained if chained is not None else [optimizer]
    inner = [getattr(w, "optimizer", w) for w in wrappers]
    return [o for o in inner if isinstance(o, torch.optim.Optimizer)]


def prime_optimizer_state(optimizer) -> int:
    """Give every parameter of torch Adam/AdamW optimizers an initial state; returns how many.

    Parameters that already have state are left alone, so calling this twice is harmless."""
    primed = 0
    for opt in _inner_torch_optimizers(optimizer):
        if not isinstance(opt, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        for group in opt.param_groups:
            for p in group["params"]:
                state = opt.state[p]
                if state:
                    continue
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group.get("amsgrad"):
                    state["max_exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                primed += 1
    return primed


def _distributed_optimizers(optimizer) -> list:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    chained = getattr(optimizer, "chained_optimizers", None)
    return [o for o in (chained if chained is not None else [optimizer]) if isinstance(o, DistributedOptimizer)]


@contextmanager
def _keep_step_on_param_state_copy(dist_opt):
    original = dist_opt._set_main_param_and_optimizer_states

    def set_states(model_param, tensors):
        if "step" not in tensors:
            group_index, group_order = dist_opt.model_param_group_index_map[model_param]
            main_param = dist_opt.optimizer.param_groups[group_index]["params"][group_order]
            step = dist_opt.optimizer.state[main_param].get("step")
            if step is not None:
                tensors = {**tensors, "step": step.clone()}
        return original(model_param, tensors)

    dist_opt._set_main_param_and_optimizer_states = set_states
    try:
        yield
    finally:
        del dist_opt._set_main_param_and_optimizer_states


def load_optimizer_state_dict(optimizer, state_dict: dict) -> None:
    """``optimizer.load_state_dict(state_dict)`` for a Megatron optimizer, working around the
    torch-Adam ``step`` KeyError of DistributedOptimizer (see the module docstring)."""
    with ExitStack() as stack:
        for dist_opt in _distributed_optimizers(optimizer):
            stack.enter_context(_keep_step_on_param_state_copy(dist_opt))
        optimizer.load_state_dict(state_dict)
    for opt in _inner_torch_optimizers(optimizer):
        for state in opt.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()  # un-share the restored counter
