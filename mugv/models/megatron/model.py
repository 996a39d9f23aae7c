"""MUGDiT on Megatron-Core: one pipeline chunk of the model, sequence-first.

A chunk holds a contiguous range of layers (its pipeline/virtual-pipeline stage), the
conditioning embedders (every chunk: timestep, fps, adaLN-single and text; their gradients are
summed over the pipeline), the patch embedder and start/end tokens on the first chunk and the
final layer on the last. The token sequence is right-padded to a multiple of TP*CP (sequence
parallel) or CP, split in contiguous chunks over CP and then over TP; see layout.TokenLayout.

A packed micro-batch (samples of different shapes: lists over groups of same-shape samples) is
one sequence of batch size 1, the samples' [start, tokens, end] one after another
(layout.PackedLayout), split the same way. Self-attention is per sample (block-diagonal),
cross-attention per sample against its own text, RoPE positions and the per-frame modulation
per sample; pipeline stages exchange [n, 1, C] (variable_seq_lengths).
"""

from __future__ import annotations

import dataclasses
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from megatron.core import parallel_state
from megatron.core.enums import ModelType
from megatron.core.fp8_utils import get_fp8_context
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from torch import nn
from torch.utils.checkpoint import checkpoint

from mugv.models.layout import PackedLayout, TokenLayout, frame_table, packed_frame_table
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


def padded_sequence_length(config: MUGDiTTransformerConfig, T: int, H: int, W: int, samples: int = 1) -> int:
    """Global token count N' (T*S + 2 rounded up to the sequence shard count) for latent T x H x W;
    the `seq_length` Megatron's pipeline schedules need. `samples` > 1: that many packed in one
    sequence."""
    return packed_sequence_length(config, [(T, H, W)] * samples)


def packed_sequence_length(config: MUGDiTTransformerConfig, shapes) -> int:
    """N' of a packed micro-batch of latents of the given (T, H, W) shapes (one sample each)."""
    tp_shards, cp = sequence_shards(config)
    n = sum(T * -(-H // PATCH[1]) * -(-W // PATCH[2]) + 2 for T, H, W in shapes)
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
        states [n, B, C].

        A packed micro-batch (samples of different shapes in one sequence) is given as lists over
        groups of same-shape samples, every argument a list of the same length: x[g]
        [B_g, Cin, T_g, H_g, W_g], timestep[g] [B_g], y[g] [B_g, 1, L_g, Ct], mask[g] [B_g, L_g],
        x_mask[g], fps[g], frame_indices[g] as for a batch (None: defaults). It runs as one
        sequence of batch size 1 with per-sample attention, and returns a list of [B_g, Cout, T_g,
        H_g, W_g]: each sample gets what it gets alone."""
        if isinstance(x, (list, tuple)):
            return self._forward_packed(x, timestep, y, mask, x_mask, fps, frame_indices)
        B, _, T, H, W = x.shape
        full = TokenLayout(T, -(-H // PATCH[1]), -(-W // PATCH[2]))
        x_mask, fps, frame_indices = default_conditioning(x, x_mask, fps, frame_indices)
        timestep, text, text_lens = self._text(timestep, y, mask)
        # 1. conditioning: per-frame embeddings and modulation, text, RoPE angles of this CP chunk
        e, e0, m, m0 = self._embed(timestep, fps)  # [B, C], [B, 6C]
        frame_emb = frame_table(x_mask, e, e0).transpose(0, 1)  # [T+1, B, C]
        frame_mod = frame_table(x_mask, m, m0).transpose(0, 1)  # [T+1, B, 6C]
        split = self._split(full.N)
        pos = full.shard(split.cp_lo, split.cp_lo + split.n_cp).positions(frame_indices)  # [B, n_cp, 3]
        ctx = DiTContext(full.shard(split.lo, split.lo + split.n_loc), full.N, self._rope(pos), frame_mod, text,
                         text_lens, chunk_lo=split.cp_lo)
        # 2. this rank's slice of [start, video tokens, end, padding]
        h = self._local_tokens(self._framed_tokens(x), split) if self.pre_process else self.input_tensor
        # 3. layers, 4. final layer
        h = run_layers(self.layers, h, ctx)
        if not self.post_process:
            return h
        out = self._final(h, frame_emb, ctx.layout)[1 : full.N - 1].transpose(0, 1)  # [B, T*S, 4*Cout]
        return unpatchify(out, T, full.Hp, full.Wp, self.config.out_channels)[..., :H, :W].float()

    def _forward_packed(self, x, timestep, y, mask, x_mask, fps, frame_indices):
        G = len(x)
        args = dict(timestep=timestep, y=y, mask=mask, x_mask=x_mask, fps=fps, frame_indices=frame_indices)
        for name, arg in args.items():
            if arg is not None and (not isinstance(arg, (list, tuple)) or len(arg) != G):
                raise ValueError(f"packed micro-batch: {name} must be a list over the {G} groups like x")
        pick = lambda a, g: None if a is None else a[g]
        conds = [default_conditioning(x[g], pick(x_mask, g), pick(fps, g), pick(frame_indices, g)) for g in range(G)]
        shapes = [(xg.shape[0], *xg.shape[2:]) for xg in x]  # (B_g, T_g, H_g, W_g)
        geo = [TokenLayout(T, -(-H // PATCH[1]), -(-W // PATCH[2])) for _, T, H, W in shapes]
        full = PackedLayout(tuple(lay for (b, *_), lay in zip(shapes, geo) for _ in range(b)))
        masks = [torch.ones(xg.shape[0], yg.shape[-2], dtype=torch.bool, device=yg.device) if pick(mask, g) is None
                 else mask[g] for g, (xg, yg) in enumerate(zip(x, y))]
        timestep, text, text_lens = self._text(torch.cat(list(timestep)), list(y), masks)
        # 1. conditioning per sample-frame: tables [F, 1, .] with F = sum of T_k + 1 over samples
        e, e0, m, m0 = self._embed(timestep, torch.cat([c[1] for c in conds]))
        x_masks = [c[0] for c in conds]
        frame_emb = packed_frame_table(x_masks, e, e0)[:, None]  # [F, 1, C]
        frame_mod = packed_frame_table(x_masks, m, m0)[:, None]  # [F, 1, 6C]
        split = self._split(full.N)
        fis = [fi for c in conds for fi in c[2]]  # per sample [T_k + 2]
        pos = full.shard(split.cp_lo, split.cp_lo + split.n_cp).positions(fis)  # [1, n_cp, 3]
        ctx = DiTContext(full.shard(split.lo, split.lo + split.n_loc), full.N, self._rope(pos), frame_mod, text,
                         text_lens, bounds=full.bounds, chunk_lo=split.cp_lo)
        # 2. the samples' framed sequences one after another: [N, C] -> this rank's slice [n_loc, 1, C]
        if self.pre_process:
            seq = torch.cat([self._framed_tokens(xg).flatten(0, 1) for xg in x])  # [N, C]
            h = self._local_tokens(seq[None], split)
        else:
            h = self.input_tensor
        # 3. layers, 4. final layer, then each group's samples back to their latents
        h = run_layers(self.layers, h, ctx)
        if not self.post_process:
            return h
        out = self._final(h, frame_emb, ctx.layout)[:, 0]  # [N', 4*Cout]
        outs, lo = [], 0
        for (b, T, H, W), lay in zip(shapes, geo):
            o = out[lo : lo + b * lay.N].view(b, lay.N, -1)[:, 1:-1]  # [B_g, T*S, 4*Cout]
            outs.append(unpatchify(o, T, lay.Hp, lay.Wp, self.config.out_channels)[..., :H, :W].float())
            lo += b * lay.N
        return outs

    # -- pieces of the forward -------------------------------------------------------------------

    def _text(self, timestep, y, mask):
        """The timestep in the model dtype, and the real text tokens of all samples packed
        [sum(text_lens), 1, C] with their lengths. y [B, 1, L, Ct] (or [B, L, Ct]) with mask [B, L],
        or lists of them (packed groups)."""
        dt = self.t_block[1].weight.dtype
        ys, masks = (y, mask) if isinstance(y, list) else ([y], [mask])
        real, text_lens = [], []
        for yg, mg in zip(ys, masks):
            yg = yg.to(dt)
            yg = yg.squeeze(1) if yg.dim() == 4 else yg  # [B, 1, Lt, Ct] -> [B, Lt, Ct]
            B, Lt = yg.shape[:2]
            mg = torch.ones(B, Lt, dtype=torch.bool, device=yg.device) if mg is None else mg.bool()
            lens = mg.sum(1).tolist()  # (one host sync per group)
            if min(lens) == 0:
                raise ValueError("a sample has no valid text token (mask all False); encode at least EOS")
            real.append(yg.reshape(B * Lt, -1) if min(lens) == Lt else yg[mg])  # [S_g, Ct]
            text_lens += lens
        text = self.y_embedder(real[0] if len(real) == 1 else torch.cat(real))[:, None]
        return timestep.to(dt), text, text_lens

    def _embed(self, timestep, fps):
        """Per sample: e = t_emb + fps_emb, e0 at t = 0, and their adaLN-single projections."""
        fps_emb = self.fps_embedder(fps)
        e = self.t_embedder(timestep) + fps_emb  # [B, C]
        e0 = self.t_embedder(torch.zeros_like(timestep)) + fps_emb
        return e, e0, self.t_block(e), self.t_block(e0)

    def _split(self, N: int) -> _Split:
        """Where this rank's tokens sit in the sequence of N tokens right-padded to N'."""
        tp_shards, cp = sequence_shards(self.config)
        n_cp = -(-N // (tp_shards * cp)) * tp_shards  # tokens per CP rank (padded sequence / cp)
        n_loc = n_cp // tp_shards
        cp_lo = parallel_state.get_context_parallel_rank() * n_cp
        lo = cp_lo + (parallel_state.get_tensor_model_parallel_rank() * n_loc if tp_shards > 1 else 0)
        return _Split(N, n_cp * cp, n_cp, n_loc, cp_lo, lo)

    def _rope(self, pos: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        rope = rope_angles(pos, cfg.kv_channels, cfg.rope_theta, cfg.rope_max_t, cfg.rope_max_hw)
        return rope.transpose(0, 1)[:, :, None]  # [n_cp, B, 1, D/2]

    def _framed_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """[B, Cin, T, H, W] -> [B, N, C]: [start, T*S patch tokens, end] per sample."""
        dt = self.t_block[1].weight.dtype
        tokens = self.x_embedder(x.to(dt))  # [B, T*S, C]
        edge = lambda p: p.to(dt).view(1, 1, -1).expand(tokens.shape[0], 1, -1)
        return torch.cat([edge(self.start_token), tokens, edge(self.end_token)], dim=1)

    def _local_tokens(self, seq: torch.Tensor, split: _Split) -> torch.Tensor:
        """[B, N, C] -> this rank's slice of the right-padded sequence, [n_loc, B, C]."""
        pad = seq.new_zeros(seq.shape[0], split.padded - split.N, seq.shape[-1])
        seq = torch.cat([seq, pad], dim=1)  # [B, N', C]
        return seq.transpose(0, 1)[split.lo : split.lo + split.n_loc].contiguous()

    def _final(self, h, frame_emb, layout) -> torch.Tensor:
        """Final layer on this rank's tokens, then the whole sequence gathered, [N', B, 4*Cout]
        (every rank computes the same loss: backward slices)."""
        out = self.final_layer(h, frame_emb, layout, seq_dim=0)  # [n_loc, B, 4*Cout]
        tp_shards, cp = sequence_shards(self.config)
        if tp_shards > 1:
            out = gather_seq(out, parallel_state.get_tensor_model_parallel_group(), grad="slice")
        if cp > 1:
            out = gather_seq(out, parallel_state.get_context_parallel_group(), grad="slice")
        return out


@dataclass(frozen=True)
class _Split:
    N: int  # real tokens
    padded: int  # N' = N rounded up to the sequence shard count
    n_cp: int  # tokens of this rank's context-parallel chunk
    n_loc: int  # tokens this rank holds (n_cp / TP under sequence parallelism)
    cp_lo: int  # global position of the CP chunk
    lo: int  # global position of this rank's tokens


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
