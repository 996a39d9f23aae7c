"""The MUGDiT block on Megatron-Core: tensor-parallel linears, the project's SDPA attention core
with context parallelism, per-frame adaLN modulation. Tensors are sequence-first [n, B, C].

Which concrete linears/norms/cores are used is decided by a ModuleSpec (see spec.py).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from torch import nn
from torch.utils.checkpoint import checkpoint

from mugv.models.layout import TokenLayout, apply_per_frame
from mugv.models.megatron.comm import gather_seq, heads_to_seq, seq_to_heads
from mugv.models.mugdit import _gate, _modulate
from mugv.models.rope import apply_rope


@dataclass
class DiTContext:
    """Per-forward inputs every layer needs, computed once by the model."""

    layout: TokenLayout  # the slice of the (padded) sequence this rank's hidden states hold
    n_real: int  # N = T*S + 2; positions >= N are padding
    rope: torch.Tensor  # [n_cp, B, 1, D/2] angles of this rank's context-parallel chunk
    frame_mod: torch.Tensor  # [T+1, B, 6C] adaLN-single output per frame (row T: start/end)
    text: torch.Tensor  # [Lt, B, C]
    text_mask: torch.Tensor | None  # [B, Lt] bool, None when no padding


def tag(params, **attrs) -> None:
    """Set gradient-reduction attributes on parameters (read by mugv.parallel's finalize)."""
    for p in params:
        for k, v in attrs.items():
            setattr(p, k, v)


class AffineLayerNorm(nn.LayerNorm):
    """torch LayerNorm with Megatron's (config, hidden_size, eps) constructor."""

    def __init__(self, config, hidden_size: int, eps: float):
        super().__init__(hidden_size, eps=eps)


class SDPACoreAttention(MegatronModule):
    """Bidirectional attention through torch SDPA over the whole (unpadded) sequence.

    q, k, v: [n, B, h, D] for this rank's context-parallel chunk. With CP > 1 either all-to-all
    over heads (Ulysses: each rank attends the full sequence with h/cp heads) or all-gather of
    K/V (each rank attends its queries to all keys). Padding keys are sliced off, so attention
    is exact with no mask."""

    def __init__(self, config, **_):
        super().__init__(config)
        self.mode = config.cp_attention
        self.cp_group = parallel_state.get_context_parallel_group() if config.context_parallel_size > 1 else None

    def forward(self, q, k, v, n_real: int) -> torch.Tensor:
        n, B, h, D = q.shape
        a2a = self.cp_group is not None and self.mode == "a2a"
        if a2a:
            q, k, v = (seq_to_heads(t, self.cp_group) for t in (q, k, v))  # [N', B, h/cp, D]
        elif self.cp_group is not None:
            k, v = gather_seq(k, self.cp_group), gather_seq(v, self.cp_group)  # [N', B, h, D]
        k, v = k[:n_real], v[:n_real]
        out = F.scaled_dot_product_attention(*(t.permute(1, 2, 0, 3) for t in (q, k, v)))  # [B, h, n, D]
        out = out.permute(2, 0, 1, 3)  # [n, B, h, D]
        if a2a:
            out = heads_to_seq(out, self.cp_group)
        return out.reshape(n, B, h * D)


@dataclass
class SelfAttentionSubmodules:
    linear_qkv: ModuleSpec | type
    core_attention: ModuleSpec | type
    linear_proj: ModuleSpec | type
    q_layernorm: ModuleSpec | type
    k_layernorm: ModuleSpec | type


class SelfAttention(MegatronModule):
    """qkv (column parallel, rows grouped per head [q_h, k_h, v_h]) -> QK RMSNorm -> 3D RoPE ->
    core attention -> proj (row parallel)."""

    def __init__(self, config, submodules: SelfAttentionSubmodules, layer_number: int = 1):
        super().__init__(config)
        C, D = config.hidden_size, config.kv_channels
        self.heads = config.num_attention_heads // config.tensor_model_parallel_size
        self.linear_qkv = build_module(
            submodules.linear_qkv, C, 3 * C, config=config, init_method=config.init_method,
            bias=True, gather_output=False, skip_bias_add=False, is_expert=False, tp_comm_buffer_name="qkv",
        )
        self.q_layernorm = build_module(submodules.q_layernorm, D, config.layernorm_epsilon)
        self.k_layernorm = build_module(submodules.k_layernorm, D, config.layernorm_epsilon)
        tag([self.q_layernorm.weight, self.k_layernorm.weight], tp_partial_grad=True)  # shared by all heads
        self.core_attention = build_module(submodules.core_attention, config=config)
        self.linear_proj = build_module(
            submodules.linear_proj, C, C, config=config, init_method=config.output_layer_init_method,
            bias=True, input_is_parallel=True, skip_bias_add=False, is_expert=False, tp_comm_buffer_name="proj",
        )

    def forward(self, x: torch.Tensor, ctx: DiTContext) -> torch.Tensor:
        qkv, _ = self.linear_qkv(x)  # [n_cp, B, 3C/tp] (sequence-parallel input gathered)
        n, B = qkv.shape[:2]
        q, k, v = qkv.view(n, B, self.heads, 3, -1).unbind(3)  # each [n_cp, B, h, D]
        q = apply_rope(self.q_layernorm(q), ctx.rope)
        k = apply_rope(self.k_layernorm(k), ctx.rope)
        if self.config.recompute_granularity == "selective":
            out = checkpoint(self.core_attention, q, k, v, ctx.n_real, use_reentrant=False)
        else:
            out = self.core_attention(q, k, v, ctx.n_real)
        out, _ = self.linear_proj(out)  # [n, B, C] (reduce-scattered under sequence parallelism)
        return out


@dataclass
class CrossAttentionSubmodules:
    linear_q: ModuleSpec | type
    linear_kv: ModuleSpec | type
    linear_proj: ModuleSpec | type
    q_layernorm: ModuleSpec | type
    k_layernorm: ModuleSpec | type


class CrossAttention(MegatronModule):
    """Video tokens attend to the (replicated, unsplit) text tokens; padded text keys masked."""

    def __init__(self, config, submodules: CrossAttentionSubmodules, layer_number: int = 1):
        super().__init__(config)
        C, D = config.hidden_size, config.kv_channels
        self.heads = config.num_attention_heads // config.tensor_model_parallel_size
        self.linear_q = build_module(
            submodules.linear_q, C, C, config=config, init_method=config.init_method,
            bias=True, gather_output=False, skip_bias_add=False, is_expert=False, tp_comm_buffer_name="q",
        )
        text_config = copy.copy(config)  # text is replicated, never sequence-split
        text_config.sequence_parallel = False
        self.linear_kv = build_module(
            submodules.linear_kv, C, 2 * C, config=text_config, init_method=config.init_method,
            bias=True, gather_output=False, skip_bias_add=False, is_expert=False, tp_comm_buffer_name="kv",
        )
        self.q_layernorm = build_module(submodules.q_layernorm, D, config.layernorm_epsilon)
        self.k_layernorm = build_module(submodules.k_layernorm, D, config.layernorm_epsilon)
        tag([self.q_layernorm.weight, self.k_layernorm.weight], tp_partial_grad=True)
        self.linear_proj = build_module(
            submodules.linear_proj, C, C, config=config, init_method=config.output_layer_init_method,
            bias=True, input_is_parallel=True, skip_bias_add=False, is_expert=False, tp_comm_buffer_name="xproj",
        )

    def forward(self, x: torch.Tensor, ctx: DiTContext) -> torch.Tensor:
        q, _ = self.linear_q(x)  # [n_cp, B, C/tp]
        kv, _ = self.linear_kv(ctx.text)  # [Lt, B, 2C/tp], rows grouped per head [k_h, v_h]
        n, B = q.shape[:2]
        q = self.q_layernorm(q.view(n, B, self.heads, -1))
        k, v = kv.view(kv.shape[0], B, self.heads, 2, -1).unbind(3)
        k = self.k_layernorm(k)
        mask = None if ctx.text_mask is None else ctx.text_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(*(t.permute(1, 2, 0, 3) for t in (q, k, v)), attn_mask=mask)
        out, _ = self.linear_proj(out.permute(2, 0, 1, 3).reshape(n, B, -1))
        return out


@dataclass
class MUGDiTLayerSubmodules:
    self_attention: ModuleSpec
    cross_attn_norm: ModuleSpec | type
    cross_attention: ModuleSpec
    mlp: ModuleSpec


class MUGDiTLayer(MegatronModule):
    """h1 = x + gate_msa * SelfAttn(mod(LN(x))); h2 = h1 + CrossAttn(LN_affine(h1));
    out = h2 + gate_mlp * MLP(mod(LN(h2)))."""

    def __init__(self, config, submodules: MUGDiTLayerSubmodules, layer_number: int = 1, **_):
        super().__init__(config)
        C = config.hidden_size
        self.layer_number = layer_number
        self.scale_shift_table = nn.Parameter(torch.randn(6, C) / C**0.5)
        self.self_attention = build_module(submodules.self_attention, config=config, layer_number=layer_number)
        self.cross_attn_norm = build_module(
            submodules.cross_attn_norm, config=config, hidden_size=C, eps=config.layernorm_epsilon
        )
        self.cross_attention = build_module(submodules.cross_attention, config=config, layer_number=layer_number)
        self.mlp = build_module(submodules.mlp, config=config)
        # replicated over TP but seeing only this rank's tokens under sequence parallelism
        tag([self.scale_shift_table, *self.cross_attn_norm.parameters()], sequence_parallel=config.sequence_parallel)

    def _ln(self, z):
        return F.layer_norm(z, z.shape[-1:], eps=self.config.layernorm_epsilon)

    def forward(self, h: torch.Tensor, ctx: DiTContext) -> torch.Tensor:
        F1, B = ctx.frame_mod.shape[:2]
        mods = (self.scale_shift_table[None, None] + ctx.frame_mod.view(F1, B, 6, -1)).unbind(2)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods  # each [T+1, B, C]
        lay = ctx.layout
        x = apply_per_frame(self._ln(h), lay, _modulate, shift_msa, scale_msa, seq_dim=0)
        h = h + apply_per_frame(self.self_attention(x, ctx), lay, _gate, gate_msa, seq_dim=0)
        h = h + self.cross_attention(self.cross_attn_norm(h), ctx)
        x = apply_per_frame(self._ln(h), lay, _modulate, shift_mlp, scale_mlp, seq_dim=0)
        out, bias = self.mlp(x)
        if bias is not None:
            out = out + bias
        return h + apply_per_frame(out, lay, _gate, gate_mlp, seq_dim=0)
