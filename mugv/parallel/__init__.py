"""Distributed runtime: process groups, Megatron-Core parallel state, the CPU (gloo) shim."""

from mugv.parallel.cpu_compat import cpu_shims, cpu_shims_installed, install_cpu_shims, uninstall_cpu_shims
from mugv.parallel.runtime import DistContext, destroy_distributed, init_distributed

__all__ = [
    "DistContext",
    "cpu_shims",
    "cpu_shims_installed",
    "destroy_distributed",
    "init_distributed",
    "install_cpu_shims",
    "uninstall_cpu_shims",
]
