"""Run Megatron-Core's CUDA-only code paths on CPU: an explicit, removable shim.

Megatron-Core assumes CUDA in many places that are not about compute at all: it allocates
scratch tensors with ``device="cuda"`` or ``device=torch.cuda.current_device()``, overlaps
communication on ``torch.cuda.Stream``s, synchronises, times with ``torch.cuda.Event``, keeps
its model-parallel RNG streams as CUDA generator states, and the distributed optimizer checks
``param.type() == 'torch.cuda.FloatTensor'``. With this shim installed, DistributedDataParallel
(overlap_grad_reduce on or off), the distributed optimizer, the pipeline schedules and
dist_checkpointing run unchanged on CPU with gloo, which lets a config be debugged on a laptop.

Everything is patched here, in one place, and only by :func:`install_cpu_shims` (importing this
module changes nothing). :func:`uninstall_cpu_shims` restores every attribute. The shim refuses
to install when CUDA is available: it must never be active next to real CUDA work.

What it does:

1. ``CudaToCpuMode`` (a TorchFunctionMode, pushed on the installing thread's mode stack):
   - any ``device=`` argument that names CUDA ("cuda", "cuda:N", torch.device("cuda"), or a
     bare int, which torch reads as a CUDA index) becomes "cpu"; ``pin_memory=True`` -> False;
   - ``Tensor.to(<cuda device>, ...)`` -> CPU; ``Tensor.cuda()`` and ``Tensor.pin_memory()``
     return the tensor itself;
   - ``Tensor.type()`` reports the CUDA type name ('torch.FloatTensor' ->
     'torch.cuda.FloatTensor'), which is what DistributedOptimizer._build_model_and_main_
     param_groups, MixedPrecisionOptimizer and clip_grads check; ``Tensor.type('torch.cuda.X')``
     converts to the CPU type 'torch.X'.
2. ``torch.cuda`` attributes replaced by CPU stand-ins: ``current_device`` ("cpu", valid even where the mode is not active, e.g. in autograd backward), ``set_device``,
   ``synchronize``, ``Stream``/``current_stream``/``default_stream``/``stream`` (one inline
   "stream", so DDP's overlapped reduce-scatter simply runs synchronously), ``Event`` (records
   wall time so Megatron timers still measure), ``nvtx.range_push/range_pop``,
   ``get_rng_state``/``set_rng_state``/``manual_seed``/``manual_seed_all`` (the CPU generator).
3. ``torch.autograd.function.BackwardCFunction.apply`` / ``apply_boxed``: the autograd engine
   runs backward with an empty TorchFunctionMode stack, so custom autograd Functions (all of
   Megatron's tensor/sequence/context-parallel communication ops) would run their backward
   without the mode; the wrappers re-enter ``CudaToCpuMode`` around each custom backward.
4. ``megatron.core.tensor_parallel.random._get_cuda_rng_state`` / ``_set_cuda_rng_state``:
   read/write the CPU default generator, so ``CudaRNGStatesTracker.fork()`` (weight init of
   TP-split layers, dropout in TP regions, activation recompute) switches the CPU RNG stream
   exactly as it switches the CUDA one on GPU. ``model_parallel_cuda_manual_seed`` therefore
   works on CPU as is. ``CudaRNGStatesTracker.fork`` itself is replaced by the same stream switch
   without its GPU-only check that the CPU generator is left untouched inside the fork: here
   the CPU generator *is* the forked stream, so that check fails on every use (Megatron's
   "CPU RNG state changed within GPU RNG context" warning) although nothing is wrong.

5. ``megatron.core.tensor_parallel.layers.fused_weight_gradient_mlp_cuda``: apex's fused
   weight-gradient accumulation (``main_grad += grad_output^T @ input`` in one GEMM) as
   ``Tensor.addmm_``, so ``gradient_accumulation_fusion`` works on CPU as on GPU: the linears'
   weight gradients go straight into DDP's fp32 ``main_grad`` buffer instead of through a
   separate gradient tensor and a second pass to add it. The first product of a step is
   written, not added, where mugv.parallel.ddp.WriteFirstDDP has left main_grad unzeroed.

Caveats: the mode is thread-local (a TorchFunctionMode lives on the installing thread's stack)
and is not active in plain tensor/module hooks that run during backward (3. covers custom
autograd Functions only); ``device="cuda"`` literals in such code would still fail. Every torch
call goes through one extra Python function while installed, which is fine for debugging-sized
runs.
"""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from mugv.utils.logging import get_logger

_INSTALLED: dict[str, Any] | None = None  # saved originals while installed
UNWRITTEN = "mugv_unwritten"  # main_grad attribute: holds last step's values, not yet this step's


def _is_cuda_device(device: Any) -> bool:
    if isinstance(device, bool):
        return False
    if isinstance(device, int):
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


def _cpu_type_name(name: Any) -> Any:
    if isinstance(name, type) and name.__module__ == "torch.cuda":
        name = f"torch.cuda.{name.__name__}"
    return name.replace("torch.cuda.", "torch.", 1) if isinstance(name, str) else name


class CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA device arguments to CPU and reports CPU tensors as CUDA in ``Tensor.type()``."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs) if kwargs else {}
        if func is torch.Tensor.cuda or func is torch.Tensor.pin_memory:
            return args[0]
        if func is torch.Tensor.type:
            if len(args) == 1 and kwargs.get("dtype") is None:
                name = func(*args)
                return name if name.startswith("torch.cuda.") else name.replace("torch.", "torch.cuda.", 1)
            if len(args) > 1:
                args = (args[0], _cpu_type_name(args[1]), *args[2:])
            if "dtype" in kwargs:
                kwargs["dtype"] = _cpu_type_name(kwargs["dtype"])
            kwargs.pop("non_blocking", None)
            return func(*args, **kwargs)
        if func is torch.Tensor.to and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], "cpu", *args[2:])
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = "cpu"
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        return func(*args, **kwargs)


class _CpuStream:
    """Stand-in for torch.cuda.Stream: CPU work is already ordered, so every call is a no-op."""

    def __init__(self, device=None, priority: int = 0, **_):
        self.device = torch.device("cpu")

    def wait_stream(self, stream) -> None:
        pass

    def wait_event(self, event) -> None:
        pass

    def record_event(self, event=None):
        event = event or _CpuEvent()
        event.record(self)
        return event

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


class _CpuEvent:
    """Stand-in for torch.cuda.Event; records wall-clock time so elapsed_time() is meaningful."""

    def __init__(self, enable_timing: bool = False, blocking: bool = False, interprocess: bool = False, **_):
        self._t: float | None = None

    def record(self, stream=None) -> None:
        self._t = time.perf_counter()

    def wait(self, stream=None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def elapsed_time(self, end: _CpuEvent) -> float:
        if self._t is None or end._t is None:
            raise RuntimeError("elapsed_time on an event that was not recorded")
        return (end._t - self._t) * 1000.0


_INLINE_STREAM = _CpuStream()


def _in_mode(backward_apply):
    """Wrap a BackwardCFunction method so the custom backward runs under CudaToCpuMode."""

    def apply(self, *args):
        if any(isinstance(m, CudaToCpuMode) for m in torch.overrides._get_current_function_mode_stack()):
            return backward_apply(self, *args)
        with CudaToCpuMode():
            return backward_apply(self, *args)

    return apply


def _cpu_rng_get(device=None, clone: bool = False, graph_safe: bool = False) -> torch.Tensor:
    return torch.get_rng_state()


def _cpu_rng_set(new_state: torch.Tensor, device=None, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


@contextmanager
def _cpu_fork(self, name: str = "model-parallel-rng"):
    """CudaRNGStatesTracker.fork on CPU: run the body on the tracked stream `name` (the CPU
    generator's state), keep where that stream got to, and restore the stream it left."""
    if name not in self.states_:
        raise Exception(f"cuda rng state {name} is not added")
    outer_name, outer_state = self._current_state_name, torch.get_rng_state()
    if outer_name != "default-rng":
        self.states_[outer_name] = outer_state
    torch.set_rng_state(self.states_[name])
    self._current_state_name = name
    try:
        yield
    finally:
        if self._current_state_name != name:
            raise Exception(f"current state name {self._current_state_name} is not the same as the desired state name {name}.")
        self.states_[name] = torch.get_rng_state()
        torch.set_rng_state(self.states_[outer_name] if outer_name != "default-rng" else outer_state)
        self._current_state_name = outer_name


def _cpu_manual_seed(seed: int) -> None:
    torch.default_generator.manual_seed(seed)


class _CpuWgradAccumulation:
    """Stand-in for apex's fused_weight_gradient_mlp_cuda (2D input [n, in], grad_output [n, out]).

    A main_grad marked `UNWRITTEN` (mugv.parallel.ddp.WriteFirstDDP leaves the weights' part of
    the buffer unzeroed) takes the step's first product by assignment instead of addition."""

    @staticmethod
    def wgrad_gemm_accum_fp32(total_input: torch.Tensor, grad_output: torch.Tensor, main_grad: torch.Tensor) -> None:
        first = getattr(main_grad, UNWRITTEN, False)
        if first:
            setattr(main_grad, UNWRITTEN, False)
        if total_input.dtype == grad_output.dtype == main_grad.dtype:
            if first:
                torch.mm(grad_output.t(), total_input, out=main_grad)
            else:
                main_grad.addmm_(grad_output.t(), total_input)
        else:  # bf16 activations into an fp32 buffer: the unfused path's product, added once
            product = grad_output.t().mm(total_input)
            if first:
                main_grad.copy_(product)
            else:
                main_grad.add_(product)

    wgrad_gemm_accum_fp16 = wgrad_gemm_accum_fp32


def _torch_cuda_replacements() -> dict[str, Any]:
    return {
        "current_device": lambda: "cpu",
        "set_device": lambda device: None,
        "synchronize": lambda device=None: None,
        "Stream": _CpuStream,
        "Event": _CpuEvent,
        "current_stream": lambda device=None: _INLINE_STREAM,
        "default_stream": lambda device=None: _INLINE_STREAM,
        "stream": lambda stream=None: nullcontext(),
        "get_rng_state": lambda device="cuda": torch.get_rng_state(),
        "set_rng_state": lambda new_state, device="cuda": torch.set_rng_state(new_state),
        "manual_seed": _cpu_manual_seed,
        "manual_seed_all": _cpu_manual_seed,
    }


def cpu_shims_installed() -> bool:
    return _INSTALLED is not None


def install_cpu_shims() -> None:
    """Install the shim (idempotent). Raises if CUDA is available: it is only for CPU runs."""
    global _INSTALLED
    if _INSTALLED is not None:
        return
    if torch.cuda.is_available():
        raise RuntimeError("install_cpu_shims: CUDA is available; the CPU shim must not be used with CUDA")
    from megatron.core.tensor_parallel import layers as mcore_layers
    from megatron.core.tensor_parallel import random as mcore_random

    saved: dict[str, Any] = {"cuda": {}, "nvtx": {}, "mcore_random": {}, "backward": {}, "layers": {}}
    for name, value in (("_grad_accum_fusion_available", True), ("fused_weight_gradient_mlp_cuda", _CpuWgradAccumulation)):
        saved["layers"][name] = getattr(mcore_layers, name, None)
        setattr(mcore_layers, name, value)
    saved["layers_module"] = mcore_layers
    saved["fork"] = mcore_random.CudaRNGStatesTracker.__dict__["fork"]
    mcore_random.CudaRNGStatesTracker.fork = _cpu_fork
    for name, value in _torch_cuda_replacements().items():
        saved["cuda"][name] = getattr(torch.cuda, name)
        setattr(torch.cuda, name, value)
    for name in ("range_push", "range_pop"):
        saved["nvtx"][name] = getattr(torch.cuda.nvtx, name)
        setattr(torch.cuda.nvtx, name, lambda *a, **k: None)
    for name, value in (("_get_cuda_rng_state", _cpu_rng_get), ("_set_cuda_rng_state", _cpu_rng_set)):
        saved["mcore_random"][name] = getattr(mcore_random, name)
        setattr(mcore_random, name, value)
    backward_cls = torch.autograd.function.BackwardCFunction
    for name in ("apply", "apply_boxed"):
        saved["backward"][name] = backward_cls.__dict__[name]
        setattr(backward_cls, name, _in_mode(saved["backward"][name]))
    mode = CudaToCpuMode()
    mode.__enter__()
    saved["mode"] = mode
    saved["module"] = mcore_random
    _INSTALLED = saved
    get_logger(__name__).debug("installed the Megatron-Core CPU shim")


def uninstall_cpu_shims() -> None:
    """Remove the shim and restore every patched attribute (no-op when not installed)."""
    global _INSTALLED
    if _INSTALLED is None:
        return
    saved, mode = _INSTALLED, _INSTALLED["mode"]
    stack = torch.overrides._get_current_function_mode_stack()
    if not stack or stack[-1] is not mode:
        raise RuntimeError("uninstall_cpu_shims: another TorchFunctionMode was entered after the shim and is still active")
    mode.__exit__(None, None, None)
    for name, value in saved["cuda"].items():
        setattr(torch.cuda, name, value)
    for name, value in saved["nvtx"].items():
        setattr(torch.cuda.nvtx, name, value)
    for name, value in saved["mcore_random"].items():
        setattr(saved["module"], name, value)
    for name, value in saved["backward"].items():
        setattr(torch.autograd.function.BackwardCFunction, name, value)
    saved["module"].CudaRNGStatesTracker.fork = saved["fork"]
    for name, value in saved["layers"].items():
        setattr(saved["layers_module"], name, value)
    _INSTALLED = None


@contextmanager
def cpu_shims():
    """Context manager form: install on entry (if not yet installed), restore on exit."""
    was_installed = cpu_shims_installed()
    install_cpu_shims()
    try:
        yield
    finally:
        if not was_installed:
            uninstall_cpu_shims()
