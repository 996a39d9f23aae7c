"""ModuleSpecs of the MUGDiT layer: the same layer class built from swappable submodules.

local: Megatron Column/RowParallelLinear, torch LayerNorm, the project's SDPA attention core.
       Runs everywhere (CPU + gloo included).
te:    Transformer Engine linears and LayerNorm (FP8-capable), for GPUs with TE installed;
       imported only when asked for. QK RMSNorm keeps the release's bf16 rounding order and the
       attention core stays the project's SDPA core (exact with padding, CP via a2a/all-gather).
"""

from __future__ import annotations

import importlib.util

from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec

from mugv.models.megatron.layer import (
    AffineLayerNorm,
    CrossAttention,
    CrossAttentionSubmodules,
    MUGDiTLayer,
    MUGDiTLayerSubmodules,
    SDPACoreAttention,
    SelfAttention,
    SelfAttentionSubmodules,
)
from mugv.models.mugdit import HeadRMSNorm


def _layer_spec(column, row, layer_norm) -> ModuleSpec:
    return ModuleSpec(
        module=MUGDiTLayer,
        submodules=MUGDiTLayerSubmodules(
            self_attention=ModuleSpec(
                module=SelfAttention,
                submodules=SelfAttentionSubmodules(
                    linear_qkv=column, core_attention=SDPACoreAttention, linear_proj=row,
                    q_layernorm=HeadRMSNorm, k_layernorm=HeadRMSNorm,
                ),
            ),
            cross_attn_norm=layer_norm,
            cross_attention=ModuleSpec(
                module=CrossAttention,
                submodules=CrossAttentionSubmodules(
                    linear_q=column, linear_kv=column, linear_proj=row,
                    q_layernorm=HeadRMSNorm, k_layernorm=HeadRMSNorm,
                ),
            ),
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=column, linear_fc2=row)),
        ),
    )


def get_layer_spec(backend: str = "local") -> ModuleSpec:
    if backend == "local":
        return _layer_spec(ColumnParallelLinear, RowParallelLinear, AffineLayerNorm)
    if backend == "te":
        if importlib.util.find_spec("transformer_engine") is None:
            raise ImportError(
                "backend 'te' needs Transformer Engine, which is not installed "
                "(pip install 'mugv[gpu]' on a CUDA machine, or use parallel.backend=local)"
            )
        from megatron.core.extensions.transformer_engine import (
            TEColumnParallelLinear,
            TENorm,
            TERowParallelLinear,
        )

        return _layer_spec(TEColumnParallelLinear, TERowParallelLinear, TENorm)
    raise ValueError(f"unknown backend {backend!r}; expected 'local' or 'te'")

