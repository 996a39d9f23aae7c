"""The MUGDiT block on Megatron-Core: tensor-parallel linears, the project's SDPA attention core
with context parallelism, per-frame adaLN modulation. Tensors are sequence-first [n, B, C].

Which concrete linears/norms/cores are used is decided by a ModuleSpec (see spec.py).

Memory: QK-norm + RoPE keeps only its (bf16) input in every mode; under `recompute: selective`
(and in the layers `full` does not recompute) the LayerNorms + modulation, QK-norm + RoPE, GELU
and layout copies are recomputed in backward from kept inputs (mugv.models.megatron.recompute),
while every matrix multiply and the attention core run once. `saved_bytes` itemises what one
layer keeps for backward; mugv.training.plan sums it and tests/test_memory_plan.py measures it.
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import dataclass
from itertools import accumulate

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from torch import nn

from mugv.models.layout import PackedLayout, TokenLayout, apply_per_frame, segment_spans
from mugv.models.megatron.comm import gather_seq, heads_to_seq, seq_to_heads
from mugv.models.megatron.packed import attend_spans
from mugv.models.megatron.recompute import SelectiveRecompute, cheap, reuse
from mugv.models.mugdit import _gate, _modulate
from mugv.models.rope import apply_rope


@dataclass
class DiTContext:
    """Per-forward inputs every layer needs, computed once by the model."""

    layout: TokenLayout | PackedLayout  # the slice of the (padded) sequence this rank's hidden states hold
    n_real: int  # N = T*S + 2 (packed: sum over samples); positions >= N are padding
    rope: torch.Tensor  # [n_cp, B, 1, D/2] angles of this rank's context-parallel chunk
    frame_mod: torch.Tensor  # [T+1, B, 6C] adaLN-single output per frame (row T: start/end); packed [F, 1, 6C]
    text: torch.Tensor  # [sum(text_lens), 1, C]: the real text tokens of all samples, packed
    text_lens: list[int]  # per sample; cross-attention and its K/V projection see only these
    # packed micro-batch (batch dim 1): sample k holds tokens [bounds[k], bounds[k+1]); attention is
    # per sample. None: one sample per batch row, each the whole sequence
    bounds: tuple[int, ...] | None = None
    chunk_lo: int = 0  # global position of the first row of this rank's context-parallel chunk

    def spans(self, lo: int, n: int) -> list[tuple[int, int, int, int, int]]:
        """Packed: query rows [lo, lo + n) (global) cut per sample, see layout.segment_spans."""
        return segment_spans(self.bounds, lo, lo + n)


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
    is exact with no mask. A packed sequence (ctx.bounds) is attended per sample: block-diagonal,
    one SDPA call per sample on CPU, one flash-attn variable-length call on GPU (packed.py)."""

    def __init__(self, config, **_):
        super().__init__(config)
        self.mode = config.cp_attention
        self.cp_group = parallel_state.get_context_parallel_group() if config.context_parallel_size > 1 else None

    def forward(self, q, k, v, ctx: DiTContext) -> torch.Tensor:
        n, B, h, D = q.shape
        a2a = self.cp_group is not None and self.mode == "a2a"
        if a2a:
            q, k, v = (seq_to_heads(t, self.cp_group) for t in (q, k, v))  # [N', B, h/cp, D]
        elif self.cp_group is not None:
            k, v = gather_seq(k, self.cp_group), gather_seq(v, self.cp_group)  # [N', B, h, D]
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [B, h', n', D]
        if ctx.bounds is None:
            outs = [F.scaled_dot_product_attention(q, k[:, :, : ctx.n_real], v[:, :, : ctx.n_real])]  # [B, h, n, D]
        else:  # per sample; queries are the whole sequence (a2a) or this CP chunk
            outs = attend_spans(q, k, v, ctx.spans(0 if a2a else ctx.chunk_lo, q.shape[2]))
        merged = lambda *o: o[0] if len(o) == 1 else torch.cat(o, dim=2)  # pieces along n
        if a2a:
            return heads_to_seq(merged(*outs).permute(2, 0, 1, 3), self.cp_group).reshape(n, B, h * D)
        to_seq = lambda *o: merged(*o).permute(2, 0, 1, 3).reshape(n, B, h * D)  # [B, h, n, D] -> [n, B, h*D]
        return reuse(to_seq(*outs), to_seq, *outs)


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
        # QK RMSNorm + RoPE: under recompute they keep only their bf16 input (a view of qkv)
        q = cheap(lambda t, r: apply_rope(self.q_layernorm(t), r), q, ctx.rope)
        k = cheap(lambda t, r: apply_rope(self.k_layernorm(t), r), k, ctx.rope)
        out = self.core_attention(q, k, v, ctx)  # [n, B, C/tp]
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
    """Video tokens attend to the (replicated, unsplit) real text tokens of their own sample."""

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
        kv, _ = self.linear_kv(ctx.text)  # [S, 1, 2C/tp] over the S packed real tokens, per head [k_h, v_h]
        n, B = q.shape[:2]
        q = cheap(self.q_layernorm, q.view(n, B, self.heads, -1))  # [n, B, h, D]
        k, v = kv.view(kv.shape[0], self.heads, 2, -1).unbind(2)  # each [S, h, D]
        k = cheap(self.k_layernorm, k)
        lens = ctx.text_lens
        start = [0, *accumulate(lens)]
        text_of = lambda s: (t[start[s] : start[s] + lens[s]].transpose(0, 1)[None] for t in (k, v))  # [1, h, m, D]
        qh = q.permute(1, 2, 0, 3)  # [B, h, n, D]
        if ctx.bounds is not None:  # packed (B = 1): each sample's rows against its own text
            outs = [F.scaled_dot_product_attention(qh[:, :, a:b], *text_of(s)) for a, b, _, _, s
                    in ctx.spans(ctx.chunk_lo, n)]  # [1, h, n_s, D] each
            merged = lambda *o: torch.cat(o, dim=2)
        elif len(set(lens)) == 1:  # equal lengths: one batched call
            kb, vb = (t.view(B, lens[0], self.heads, -1).transpose(1, 2) for t in (k, v))  # [B, h, L, D]
            outs, merged = [F.scaled_dot_product_attention(qh, kb, vb)], lambda o: o  # [B, h, n, D]
        else:  # each sample against its own tokens, no padding
            outs = [F.scaled_dot_product_attention(qh[b : b + 1], *text_of(b)) for b in range(B)]
            merged = lambda *o: torch.cat(o)  # [B, h, n, D]
        to_seq = lambda *o: merged(*o).permute(2, 0, 1, 3).reshape(n, B, -1)  # [n, B, C/tp]
        out, _ = self.linear_proj(reuse(to_seq(*outs), to_seq, *outs))
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

        # recompute the cheap parts: selective, and the layers `full` leaves out (recompute_layers)
        self.selective = config.recompute_granularity in ("selective", "full")

    def _ln(self, z):
        return F.layer_norm(z, z.shape[-1:], eps=self.config.layernorm_epsilon)

    def forward(self, h: torch.Tensor, ctx: DiTContext) -> torch.Tensor:
        with SelectiveRecompute() if self.selective and torch.is_grad_enabled() else nullcontext():
            return self._forward(h, ctx)

    def _forward(self, h: torch.Tensor, ctx: DiTContext) -> torch.Tensor:
        F1, B = ctx.frame_mod.shape[:2]
        mods = (self.scale_shift_table[None, None] + ctx.frame_mod.view(F1, B, 6, -1)).unbind(2)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods  # each [T+1, B, C]
        lay = ctx.layout
        ln_mod = lambda z, shift, scale: apply_per_frame(self._ln(z), lay, _modulate, shift, scale, seq_dim=0)
        x = cheap(ln_mod, h, shift_msa, scale_msa)
        h = h + apply_per_frame(self.self_attention(x, ctx), lay, _gate, gate_msa, seq_dim=0)
        h = h + self.cross_attention(cheap(self.cross_attn_norm, h), ctx)
        out, bias = self.mlp(cheap(ln_mod, h, shift_mlp, scale_mlp))  # GELU: see config.gelu_tanh
        if bias is not None:
            out = out + bias
        return h + apply_per_frame(out, lay, _gate, gate_mlp, seq_dim=0)


@dataclass(frozen=True)
class SavedBytes:
    """Bytes kept for backward, per token of this rank's context-parallel chunk (per sample), per
    text token and per latent frame of a sample (+1 for the start/end row)."""

    token: float
    text_token: float
    frame: float

    def total(self, tokens: int, text_tokens: int, frames: int) -> float:
        return self.token * tokens + self.text_token * text_tokens + self.frame * frames


def saved_bytes(mode: str | None, elem: int, C: int, heads: int, tp: int = 1, sp: bool = False,
                cp: int = 1, cp_attention: str = "a2a") -> SavedBytes:
    """What one MUGDiT layer keeps for backward under recompute `mode` (None, "selective", or a
    layer that `full` recomputes), activations of `elem` bytes (2 bf16, 4 fp32). Itemised from
    the code above; tests/test_memory_plan.py measures it (TP = CP = 1).

    R: residual-shaped [n/s, B, C] (s = tp under sequence parallelism, else 1);
    H: head-shaped [n, B, C/tp] (outputs of column-parallel linears)."""
    s = tp if sp and tp > 1 else 1
    R, H, D = elem * C / s, elem * C / tp, C // heads
    lse = 2 * 4 * heads / tp  # fp32 log-sum-exp per head, self- and cross-attention
    if mode == "full":  # the layer input only (rope, modulation and text are shared: see shared_saved_bytes)
        return SavedBytes(R, 0.0, 0.0)
    # kept in every mode: layer input h, h1 (cross-attn LN input), h2 (MLP LN input), the gate
    # operands (proj output, fc2 output); qkv (3, v and the QK-norm inputs are views of it), the
    # attention outputs (self, cross), the cross-attention q (QK-norm input), fc1 output (4, GELU input)
    r, h = 5, 3 + 1 + 1 + 1 + 4
    per_token = lse
    text = 2 * H  # K/V of the text tokens (the K-norm input and V are views)
    if mode is None:
        # LN outputs (modulation operands, x2), inputs of linear_qkv, linear_q, fc1 (x3);
        # normalised + rotated q, k and the cross-attention q (x3), GELU output (4); QK-norm and
        # RoPE internals: fp32 copies of q, k and the cross q (bf16 only) and the normalised q, k
        r, h = r + 5, h + 3 + 4 + (9 if elem == 2 else 3)
        per_token += 3 * 2 * elem / s + 3 * 4 * heads / tp + 2 * 2 * 4 * D / 2  # LN stats, RMS rsqrt, RoPE cos/sin
        text += (3 if elem == 2 else 1) * H  # k-norm: fp32 copy and the normalised k
    if cp > 1 and cp_attention == "a2a":
        h += 4  # q, k, v after the all-to-all, and the output back before proj
    elif cp > 1:
        h += 2 * cp - (2 if mode is None else 0)  # gathered k, v (instead of the local rotated k)
    return SavedBytes(r * R + h * H + per_token, text, 12 * C * elem)


def shared_saved_bytes(elem: int, C: int, D: int) -> SavedBytes:
    """Kept once for all layers of a chunk: RoPE angles (fp32), the text (packed real tokens),
    the per-frame modulation."""
    return SavedBytes(4 * D / 2, C * elem, 6 * C * elem)
