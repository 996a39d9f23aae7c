"""Run a function on N local processes (gloo on CPU) and collect each rank's result.

    results = run_distributed(fn, 2, arg1, timeout=60)   # fn(rank, world_size, arg1) on 2 ranks

Processes come from a multiprocessing fork server that has torch and Megatron-Core imported
once per test session, so a spawn costs a fork, not an import (~0.3 s for a 2-rank run with
process-group set-up). The fork server never runs torch code itself, so children are safe from
the OpenMP-after-fork hang that plain `fork` from a busy pytest process risks; fn and args must
therefore be picklable (module-level functions). Each rank gets RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and a free MASTER_PORT in its environment and runs with one torch thread. fn may call mugv.parallel.init_distributed(); the harness tears the process group
down after fn returns. A failure on any rank raises in the parent with that rank's traceback and
kills the others; nothing outlives `timeout`.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any


class DistributedRankError(RuntimeError):
    """A rank raised (or died); the message carries its traceback."""


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(fn: Callable, rank: int, world_size: int, port: int, args: tuple, results) -> None:
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    import torch

    torch.set_num_threads(1)
    try:
        value = fn(rank, world_size, *args)
        # plain pickle: tensors go by value, not as shared-memory handles that die with this process
        results.put((rank, True, pickle.dumps(value)))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))
    finally:
        _teardown()


def _teardown() -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    from mugv.parallel.runtime import destroy_distributed

    try:
        dist.barrier()
        destroy_distributed()
    except Exception:
        pass


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
    "pytest",
    "tests.dist_harness",
]
_CONTEXT = None


def _context():
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = mp.get_context("forkserver")
        _CONTEXT.set_forkserver_preload(PRELOAD)
    return _CONTEXT


def run_distributed(fn: Callable, world_size: int, *args: Any, timeout: float = 120.0) -> list[Any]:
    """Run fn(rank, world_size, *args) on `world_size` processes; return the results by rank.

    Raises DistributedRankError (with the rank's traceback) if a rank fails or dies, and
    TimeoutError if not all ranks finish within `timeout` seconds; the others are killed."""
    ctx = _context()
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_child, args=(fn, r, world_size, port, args, results))  # not daemonic: ranks may start helpers
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(out) < world_size:
            try:
                rank, ok, payload = results.get(timeout=0.05)
            except queue.Empty:
                _check_alive(procs, out, results)
                if time.monotonic() > deadline:
                    missing = sorted(set(range(world_size)) - set(out))
                    raise TimeoutError(f"run_distributed: ranks {missing} did not finish within {timeout}s") from None
                continue
            if not ok:
                raise DistributedRankError(f"rank {rank} of {world_size} failed:\n{payload}")
            out[rank] = pickle.loads(payload)
        for p in procs:  # results are in; give teardown a few seconds, then kill
            p.join(min(10.0, max(0.1, deadline - time.monotonic())))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        results.close()
    return [out[r] for r in range(world_size)]


def _check_alive(procs, out: dict, results) -> None:
    for rank, p in enumerate(procs):
        if rank not in out and p.exitcode is not None:
            time.sleep(0.2)  # a result put just before exit may still be in the pipe
            if results.empty():
                raise DistributedRankError(f"rank {rank} exited with code {p.exitcode} without a result")
