"""Run a function on N local processes (gloo on CPU) and collect each rank's result.

    results = run_distributed(fn, 2, arg1, timeout=60)   # fn(rank, world_size, arg1) on 2 ranks

A thin use of mugv.parallel.launch.spawn: processes come from a fork server that has torch and
Megatron-Core imported once per test session, so a spawn costs a fork, not an import (~0.3 s
for a 2-rank run with process-group set-up). The fork server never runs torch code itself, so
children are safe from the OpenMP-after-fork hang that plain `fork` from a busy pytest process
risks; fn and args must therefore be picklable (module-level functions). Each rank runs with one
torch thread and the launcher's rank variables; fn may call mugv.parallel.init_distributed(),
and the process group is torn down after fn returns.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mugv.parallel.launch import DistributedRankError, spawn

__all__ = ["DistributedRankError", "run_distributed"]

# imported once in the fork server; every rank forks with these already loaded
PRELOAD = [
    "torch",
    "megatron.core.parallel_state",
    "megatron.core.tensor_parallel",
    "megatron.core.distributed",
    "megatron.core.optimizer",
    "megatron.core.pipeline_parallel",
    "megatron.core.dist_checkpointing",
    "mugv.parallel",
    "mugv.parallel.launch",
    "pytest",
    "tests.dist_harness",
]


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout: float = 120.0) -> list[Any]:
    """fn(rank, world_size, *args) on `world_size` processes; the results by rank (see spawn)."""
    return spawn(fn, world_size, *args, timeout=timeout, method="forkserver", preload=PRELOAD, threads=1)
