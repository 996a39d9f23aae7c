"""MUGDiT on Megatron-Core: one pipeline chunk of the model, sequence-first.

A chunk holds a contiguous range of layers (its pipeline/virtual-pipeline stage), the
conditioning embedders (every chunk: timestep, fps, adaLN-single and text; their gradients are
summed over the pipeline), the patch embedder and start/end tokens on the first chunk and the
final layer on the last. The token sequence is right-padded to a multiple of TP*CP (sequence
parallel) or CP, split in contiguous chunks over CP and then over TP; see layout.TokenLayout.
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext

import torch
from megatron.core import parallel_state
from megatron.core.enums import ModelType
from megatron.core.fp8_utils import get_fp8_context
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from torch import nn
from torch.utils.checkpoint import checkpoint

from mugv.models.layout import TokenLayout, frame_table
from mugv.models.megatron.comm import gather_seq
from mugv.models.megatron.config import MUGDiTTransformerConfig
from mugv.models.megatron.layer import DiTContext, tag
from mugv.models.megatron.spec import get_layer_spec
from mugv.models.mugdit import (
    PATCH,
    CaptionEmbedder,
    FinalLayer,
    PatchEmbed3D,
    TimestepEmbedder,
    default_conditioning,
    unpatchify,
)
from mugv.models.rope import rope_angles


def layer_range(config: MUGDiTTransformerConfig, vp_stage: int | None) -> tuple[int, int]:
    """(first global layer index, number of layers) of this rank's (virtual) pipeline chunk."""
    pp = config.pipeline_model_parallel_size
    vpp = config.virtual_pipeline_model_parallel_size or 1
    if config.num_layers % (pp * vpp):
        raise ValueError(f"depth {config.num_layers} is not divisible by PP {pp} x virtual PP {vpp}")
    per_chunk = config.num_layers // (pp * vpp)
    rank = parallel_state.get_pipeline_model_parallel_rank()
    return (vp_stage or 0) * (config.num_layers // vpp) + rank * per_chunk, per_chunk


def sequence_shards(config: MUGDiTTransformerConfig) -> tuple[int, int]:
    """(TP shards of the sequence: TP size under sequence parallelism else 1, CP size)."""
    tp = config.tensor_model_parallel_size if config.sequence_parallel else 1
    return tp, config.context_parallel_size


def padded_sequence_length(config: MUGDiTTransformerConfig, T: int, H: int, W: int) -> int:
    """Global token count N' (T*S + 2 rounded up to the sequence shard count) for latent T x H x W;
    the `seq_length` Megatron's pipeline schedules need."""
    tp_shards, cp = sequence_shards(config)
    n = T * -(-H // PATCH[1]) * -(-W // PATCH[2]) + 2
    return -(-n // (tp_shards * cp)) * tp_shards * cp


class MUGDiTMegatron(MegatronModule):
    def __init__(
        self,
        config: MUGDiTTransformerConfig,
        layer_spec: ModuleSpec | None = None,
        pre_process: bool = True,
        post_process: bool = True,
        vp_stage: int | None = None,
    ):
        super().__init__(config)
        C = config.hidden_size
        dit = config.dit
        self.model_type = ModelType.encoder_or_decoder
        self.pre_process, self.post_process, self.vp_stage = pre_process, post_process, vp_stage
        self.input_tensor = None
        # conditioning, on every pipeline chunk
        self.t_embedder = TimestepEmbedder(C, dit.frequency_embedding_size)
        self.fps_embedder = TimestepEmbedder(C, dit.frequency_embedding_size)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(C, 6 * C))
        self.y_embedder = CaptionEmbedder(dit.caption_channels, C, dit.norm_eps)
        per_frame = [*self.t_embedder.parameters(), *self.fps_embedder.parameters(), *self.t_block.parameters()]
        tag([*per_frame, *self.y_embedder.parameters()], pipeline_parallel=True)
        # their outputs condition only this rank's tokens under sequence parallelism
        tag(per_frame, sequence_parallel=config.sequence_parallel)
        if pre_process:
            self.x_embedder = PatchEmbed3D(dit.in_channels, C)
            self.start_token = nn.Parameter(torch.randn(C) * 0.02)
            self.end_token = nn.Parameter(torch.randn(C) * 0.02)
            tag([*self.x_embedder.parameters(), self.start_token, self.end_token],
                sequence_parallel=config.sequence_parallel)
        self.layer_offset, count = layer_range(config, vp_stage)
        spec = layer_spec or get_layer_spec(config.backend, config.te_attention)
        self.layers = nn.ModuleList(
            build_module(spec, config=config, layer_number=self.layer_offset + i + 1) for i in range(count)
        )
        if post_process:
            self.final_layer = FinalLayer(dit)
            tag(self.final_layer.parameters(), sequence_parallel=config.sequence_parallel)

    def set_input_tensor(self, input_tensor) -> None:
        """Hidden states from the previous pipeline stage (called by Megatron's schedules)."""
        self.input_tensor = input_tensor[0] if isinstance(input_tensor, (list, tuple)) else input_tensor

    def forward(self, x, timestep, y, mask=None, x_mask=None, fps=None, frame_indices=None):
        """Same inputs as mugv.models.MUGDiT (every pipeline stage receives the batch).
        Returns [B, Cout, T, H, W] fp32 (gathered) on the last stage, else this rank's hidden
        states [n, B, C]."""
        cfg = self.config
        dt = self.t_block[1].weight.dtype
        B, _, T, H, W = x.shape
        full = TokenLayout(T, -(-H // PATCH[1]), -(-W // PATCH[2]))
        N = full.N
        tp_shards, cp = sequence_shards(cfg)
        n_cp = -(-N // (tp_shards * cp)) * tp_shards  # tokens per CP rank (padded sequence / cp)
        n_loc = n_cp // tp_shards
        cp_lo = parallel_state.get_context_parallel_rank() * n_cp
        lo = cp_lo + (parallel_state.get_tensor_model_parallel_rank() * n_loc if tp_shards > 1 else 0)
        x_mask, fps, frame_indices = default_conditioning(x, x_mask, fps, frame_indices)
        timestep, y = timestep.to(dt), y.to(dt)
        if y.dim() == 4:
            y = y.squeeze(1)  # [B, 1, Lt, Ct] -> [B, Lt, Ct]
        Lt = y.shape[1]
        mask = torch.ones(B, Lt, dtype=torch.bool, device=y.device) if mask is None else mask.bool()
        text_lens = mask.sum(1).tolist()  # (one host sync per forward)
        if min(text_lens) == 0:
            raise ValueError("a sample has no valid text token (mask all False); encode at least EOS")

        # 1. conditioning: per-frame embeddings and modulation, text, RoPE angles of this CP chunk
        fps_emb = self.fps_embedder(fps)
        e = self.t_embedder(timestep) + fps_emb  # [B, C]
        e0 = self.t_embedder(torch.zeros_like(timestep)) + fps_emb
        frame_emb = frame_table(x_mask, e, e0).transpose(0, 1)  # [T+1, B, C]
        frame_mod = frame_table(x_mask, self.t_block(e), self.t_block(e0)).transpose(0, 1)  # [T+1, B, 6C]
        # text over the real tokens only, packed sample after sample: [sum(text_lens), 1, C]
        real = y.reshape(B * Lt, -1) if min(text_lens) == Lt else y[mask]  # [S, Ct]
        text = self.y_embedder(real)[:, None]
        pos = full.shard(cp_lo, cp_lo + n_cp).positions(frame_indices)  # [B, n_cp, 3]
        rope = rope_angles(pos, cfg.kv_channels, cfg.rope_theta, cfg.rope_max_t, cfg.rope_max_hw)
        rope = rope.transpose(0, 1)[:, :, None]  # [n_cp, B, 1, D/2]
        layout = full.shard(lo, lo + n_loc)
        ctx = DiTContext(layout, N, rope, frame_mod, text, text_lens)

        # 2. this rank's slice of [start, video tokens, end, padding]
        if self.pre_process:
            tokens = self.x_embedder(x.to(dt))  # [B, T*S, C]
            edge = lambda p: p.to(dt).view(1, 1, -1).expand(B, 1, -1)
            pad = tokens.new_zeros(B, n_cp * cp - N, tokens.shape[-1])
            seq = torch.cat([edge(self.start_token), tokens, edge(self.end_token), pad], dim=1)  # [B, N', C]
            h = seq.transpose(0, 1)[lo : lo + n_loc].contiguous()  # [n_loc, B, C]
        else:
            h = self.input_tensor

        # 3. layers
        h = run_layers(self.layers, h, ctx)
        if not self.post_process:
            return h

        # 4. final layer, gather the sequence (every rank computes the same loss: backward slices)
        out = self.final_layer(h, frame_emb, layout, seq_dim=0)  # [n_loc, B, 4*Cout]
        if tp_shards > 1:
            out = gather_seq(out, parallel_state.get_tensor_model_parallel_group(), grad="slice")
        if cp > 1:
            out = gather_seq(out, parallel_state.get_context_parallel_group(), grad="slice")
        out = out[1 : N - 1].transpose(0, 1)  # [B, T*S, 4*Cout]
        return unpatchify(out, T, full.Hp, full.Wp, cfg.out_channels)[..., :H, :W].float()


def run_layers(layers, h: torch.Tensor, ctx: DiTContext) -> torch.Tensor:
    """A chunk's layers. `full` recomputes the first recompute_num_layers of them whole in backward
    (keeping only their inputs); the others recompute their cheap parts (see layer.py)."""
    cfg = layers[0].config if len(layers) else None
    n_full = cfg.recompute_num_layers if cfg and cfg.recompute_granularity == "full" and torch.is_grad_enabled() else 0
    for i, layer in enumerate(layers):
        if i < n_full:
            h = checkpoint(_run_layer, layer, h, ctx.rope, ctx.frame_mod, ctx.text, ctx, use_reentrant=True, preserve_rng_state=False)
        else:
            h = _run_layer(layer, h, ctx.rope, ctx.frame_mod, ctx.text, ctx)
    return h


def _run_layer(layer, h, rope, frame_mod, text, ctx: DiTContext):
    """One layer (under Transformer Engine's FP8 autocast when config.fp8 is set), its tensor
    inputs explicit so that a reentrant checkpoint keeps and re-feeds them."""
    cfg = layer.config
    ctx = dataclasses.replace(ctx, rope=rope, frame_mod=frame_mod, text=text)
    with get_fp8_context(cfg, layer.layer_number - 1) if cfg.fp8 else nullcontext():
        return layer(h, ctx)


def build_model_chunks(config: MUGDiTTransformerConfig, layer_spec: ModuleSpec | None = None) -> list:
    """This rank's model chunks (one, or virtual-PP many), unwrapped (no DDP, no fp16 wrapper)."""
    vpp = config.virtual_pipeline_model_parallel_size
    stages = range(vpp) if vpp else [None]
    chunks = []
    for v in stages:
        pre = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=v)
        post = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=v)
        chunks.append(MUGDiTMegatron(config, layer_spec, pre_process=pre, post_process=post, vp_stage=v))
    return chunks
