"""ModuleSpecs of the MUGDiT layer: the same layer class built from swappable submodules.

local: Megatron Column/RowParallelLinear, torch LayerNorm, the project's SDPA attention core.
       Runs everywhere (CPU + gloo included).
te:    Transformer Engine linears and LayerNorm (FP8-capable), for GPUs with TE installed;
       imported only when asked for. QK RMSNorm keeps the release's bf16 rounding order. The
       self-attention core is the project's SDPA core, or with `te_attention` Transformer
       Engine's DotProductAttention (cuDNN / flash kernels); both slice padding keys off and do
       context parallelism through the project's Ulysses all-to-all or KV all-gather.

`lora` (a LoRASettings) swaps the targeted linears for their LoRA classes (mugv.models.megatron.lora):
the same base class with an adapter, sharded like it, for either backend.
"""

from __future__ import annotations

import importlib.util

from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec

from mugv.models.megatron.comm import gather_seq, heads_to_seq, seq_to_heads
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
from mugv.models.megatron.lora import COLUMN, ROW, LoRASettings, lora_spec
from mugv.models.mugdit import HeadRMSNorm


class TECoreAttention(SDPACoreAttention):
    """Transformer Engine's DotProductAttention as the self-attention core: the same contract as
    SDPACoreAttention (q, k, v [n, B, h, D] of this CP chunk -> [n, B, h*D]). A packed sequence
    goes through SDPACoreAttention's per-sample path (flash-attn varlen when installed)."""

    def __init__(self, config, **_):
        super().__init__(config)
        from transformer_engine.pytorch import DotProductAttention

        cp = config.context_parallel_size
        heads = config.num_attention_heads // config.tensor_model_parallel_size
        heads //= cp if cp > 1 and self.mode == "a2a" else 1
        self.attn = DotProductAttention(heads, config.kv_channels, attention_dropout=0.0, qkv_format="sbhd",
                                        attn_mask_type="no_mask")

    def forward(self, q, k, v, ctx):
        if ctx.bounds is not None:
            return super().forward(q, k, v, ctx)
        n, B, h, D = q.shape
        a2a = self.cp_group is not None and self.mode == "a2a"
        if a2a:
            q, k, v = (seq_to_heads(t, self.cp_group) for t in (q, k, v))  # [N', B, h/cp, D]
        elif self.cp_group is not None:
            k, v = gather_seq(k, self.cp_group), gather_seq(v, self.cp_group)
        k, v = k[: ctx.n_real], v[: ctx.n_real]
        out = self.attn(q.contiguous(), k.contiguous(), v.contiguous())  # [n', B, h'*D]
        if a2a:
            out = heads_to_seq(out.view(out.shape[0], B, -1, D), self.cp_group)
        return out.reshape(n, B, h * D)


def _layer_spec(column, row, layer_norm, core=SDPACoreAttention, lora: LoRASettings | None = None) -> ModuleSpec:
    col = lambda target: lora_spec(column, COLUMN, target, lora)
    rowp = lambda target: lora_spec(row, ROW, target, lora)
    return ModuleSpec(
        module=MUGDiTLayer,
        submodules=MUGDiTLayerSubmodules(
            self_attention=ModuleSpec(
                module=SelfAttention,
                submodules=SelfAttentionSubmodules(
                    linear_qkv=col("qkv"), core_attention=core, linear_proj=rowp("proj"),
                    q_layernorm=HeadRMSNorm, k_layernorm=HeadRMSNorm,
                ),
            ),
            cross_attn_norm=layer_norm,
            cross_attention=ModuleSpec(
                module=CrossAttention,
                submodules=CrossAttentionSubmodules(
                    linear_q=col("cross_q"), linear_kv=col("cross_kv"), linear_proj=rowp("cross_proj"),
                    q_layernorm=HeadRMSNorm, k_layernorm=HeadRMSNorm,
                ),
            ),
            mlp=ModuleSpec(module=MLP, submodules=MLPSubmodules(linear_fc1=col("fc1"), linear_fc2=rowp("fc2"))),
        ),
    )


def get_layer_spec(backend: str = "local", te_attention: bool = False, lora: LoRASettings | None = None) -> ModuleSpec:
    if backend == "local":
        return _layer_spec(ColumnParallelLinear, RowParallelLinear, AffineLayerNorm, lora=lora)
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

        return _layer_spec(TEColumnParallelLinear, TERowParallelLinear, TENorm,
                           TECoreAttention if te_attention else SDPACoreAttention, lora)
    raise ValueError(f"unknown backend {backend!r}; expected 'local' or 'te'")

