"""Process-group and Megatron-Core parallel-state set-up, on GPU (NCCL) or CPU (gloo).

    ctx = init_distributed(tp=2, pp=1, seed=1234)   # reads RANK/WORLD_SIZE/MASTER_* from env
    ...                                              # build models with Megatron-Core
    destroy_distributed()

On CPU the gloo backend is chosen and the Megatron-Core CPU shim
(:mod:`mugv.parallel.cpu_compat`) is installed, so DDP, the distributed optimizer, pipeline
schedules and dist_checkpointing run unchanged; :func:`destroy_distributed` removes it again.
On CPU it also keeps freed heap memory in the process (:func:`retain_freed_memory`).
Nothing happens at import time.
"""

from __future__ import annotations

import ctypes
import os
import random
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from mugv.parallel.cpu_compat import install_cpu_shims, uninstall_cpu_shims
from mugv.utils.logging import get_logger

_BACKENDS = ("nccl", "gloo")


@dataclass(frozen=True)
class DistContext:
    """What init_distributed set up: this rank and the parallel layout."""

    rank: int
    world_size: int
    tp: int
    pp: int
    cp: int
    dp: int
    vpp: int | None
    backend: str
    device: torch.device


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)


def retain_freed_memory(trim_threshold: int = 1 << 30, mmap_threshold: int = 32 << 20) -> bool:
    """Keep freed heap memory in this process instead of handing it back to the OS (glibc only;
    False, and nothing changed, elsewhere). Process-wide and not undone.

    Why, on CPU: the gradients live in DDP's persistent buffer, so when the backward frees the
    activations nothing refills the heap, and glibc's default (a trim threshold that follows the
    largest freed block, 64 MB at most) returns the free top of the heap to the OS; the
    optimizer's temporaries then page it back in. At C=576 that was ~10k page faults (~40 MB
    zero-filled by the kernel) per step, ~2% of the step (tools/bench_step.py). The memory kept
    is at most the step's own peak, which the next step reuses, as the CUDA caching allocator
    does on GPU. Blocks of mmap_threshold bytes and more are still mapped and unmapped whole."""
    try:
        libc = ctypes.CDLL(None)  # the process's own symbols, libc's among them
        version = libc.gnu_get_libc_version
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    version.restype = ctypes.c_char_p
    if not version():
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))


def _env_int(name: str, default: int | None = None) -> int:
    value = os.environ.get(name)
    if value is None:
        if default is None:
            raise ValueError(f"init_distributed: environment variable {name} is not set (and no value was passed)")
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"init_distributed: environment variable {name}={value!r} is not an integer") from None


def _validate_layout(world_size: int, tp: int, pp: int, cp: int, vpp: int | None) -> int:
    for name, value in (("tp", tp), ("pp", pp), ("cp", cp)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"init_distributed: {name} must be a positive int, got {value!r}")
    model_parallel = tp * pp * cp
    if world_size % model_parallel:
        raise ValueError(f"init_distributed: world size {world_size} is not divisible by tp*pp*cp = {model_parallel}")
    if vpp is not None and (vpp < 1 or pp < 2):
        raise ValueError(f"init_distributed: vpp={vpp} needs pp >= 2 and vpp >= 1 (pp={pp})")
    return world_size // model_parallel


def init_distributed(
    tp: int = 1,
    pp: int = 1,
    cp: int = 1,
    vpp: int | None = None,
    backend: str | None = None,
    seed: int = 1234,
    rank: int | None = None,
    world_size: int | None = None,
    timeout_minutes: float = 30.0,
) -> DistContext:
    """Initialise torch.distributed (if not already) and Megatron-Core's parallel state.

    backend: "nccl" or "gloo"; default nccl when CUDA is available, else gloo (+ the CPU shim).
    rank / world_size default to $RANK / $WORLD_SIZE; the rendezvous uses $MASTER_ADDR and
    $MASTER_PORT (env://). Seeds python, numpy and torch with `seed` and sets up Megatron's
    model-parallel RNG tracker (TP ranks get distinct streams, see model_parallel_cuda_manual_seed).
    """
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend not in _BACKENDS:
        raise ValueError(f"init_distributed: backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "nccl" and not torch.cuda.is_available():
        raise ValueError("init_distributed: backend 'nccl' needs CUDA, which is not available")
    rank = _env_int("RANK", 0) if rank is None else rank
    world_size = _env_int("WORLD_SIZE", 1) if world_size is None else world_size
    dp = _validate_layout(world_size, tp, pp, cp, vpp)

    if backend == "nccl":
        device = torch.device("cuda", _env_int("LOCAL_RANK", rank % torch.cuda.device_count()))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        if torch.cuda.is_available():
            raise ValueError("init_distributed: gloo on a CUDA machine is not supported; use nccl")
        install_cpu_shims()
        retain_freed_memory()

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        if "MASTER_PORT" not in os.environ:
            raise ValueError("init_distributed: MASTER_PORT is not set")
        dist.init_process_group(
            backend, rank=rank, world_size=world_size, timeout=timedelta(minutes=timeout_minutes)
        )
    elif dist.get_world_size() != world_size or dist.get_backend() != backend:
        raise ValueError(
            f"init_distributed: torch.distributed is already initialised with world size "
            f"{dist.get_world_size()} / backend {dist.get_backend()}, not {world_size} / {backend}"
        )
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        context_parallel_size=cp,
        distributed_timeout_minutes=int(max(1, timeout_minutes)),
    )
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:
        pass
    model_parallel_cuda_manual_seed(seed, force_reset_rng=True)
    ctx = DistContext(rank, world_size, tp, pp, cp, dp, vpp, backend, device)
    get_logger(__name__).info(f"distributed: {backend}, world {world_size} = tp {tp} x pp {pp} x cp {cp} x dp {dp}")
    return ctx


def destroy_distributed() -> None:
    """Tear down Megatron's parallel state, the process group and (on CPU) the shim. Idempotent."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()
    uninstall_cpu_shims()
