"""The token sequence of MUGDiT and the per-frame conditioning that rides on it.

A clip of T latent frames with an Hp x Wp patch grid (S = Hp * Wp tokens a frame) is the
sequence [start, T*S video tokens (frame-major, row, column), end] of N = T*S + 2 tokens.
Every token is conditioned either by its frame's vector (frames being denoised use the
noisy-timestep modulation, clean conditioning frames the t=0 one) or, for start/end, by the
t=0 vector. `TokenLayout.runs()` cuts any contiguous slice of that sequence (all of it in the
plain model; one rank's shard under sequence/context parallelism) into runs of whole frames,
so a per-frame table [.., T+1, ..] (row T = the start/end row) is applied by broadcasting over
the S tokens of a frame instead of being materialised per token.

A packed micro-batch (`PackedLayout`) puts several samples of different shapes one after another
in one sequence (batch dimension 1): sample k is [start, T_k*S_k tokens, end] at
[bounds[k], bounds[k+1]), its per-frame table rows follow the previous samples' (T_j + 1 each),
and padding after the last sample belongs to the last sample's start/end row. Attention is
block-diagonal: `segment_spans` cuts any range of query rows into per-sample pieces.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from itertools import accumulate

import torch


@dataclass(frozen=True)
class Run:
    """Local tokens [offset, offset + frames * per_frame) belong to table rows `rows` (one each)."""

    offset: int
    frames: int
    per_frame: int
    row_lo: int  # rows row_lo .. row_lo + frames - 1 of the per-frame table


@dataclass(frozen=True)
class TokenLayout:
    """Global geometry of the sequence, and the slice [lo, hi) of it that this module holds.

    Under sequence/context parallelism the sequence is right-padded to a multiple of the shard
    count, so hi may exceed N: padding tokens use the start/end row and position (0, 0, 0);
    attention never uses them as keys and the output drops them.
    """

    T: int
    Hp: int
    Wp: int
    lo: int = 0
    hi: int | None = None

    @property
    def S(self) -> int:
        return self.Hp * self.Wp

    @property
    def N(self) -> int:
        return self.T * self.S + 2

    @property
    def stop(self) -> int:
        return self.N if self.hi is None else self.hi

    def shard(self, lo: int, hi: int) -> TokenLayout:
        return TokenLayout(self.T, self.Hp, self.Wp, lo, hi)

    def runs(self) -> list[Run]:
        lo, hi, S, T = self.lo, self.stop, self.S, self.T
        out: list[Run] = []
        if lo == 0 and hi > 0:
            out.append(Run(0, 1, 1, T))
        a, b = max(lo, 1), min(hi, 1 + T * S)
        while a < b:
            frame, within = divmod(a - 1, S)
            if within == 0 and b - a >= S:
                n = (b - a) // S
                out.append(Run(a - lo, n, S, frame))
                a += n * S
            else:
                take = min(S - within, b - a)
                out.append(Run(a - lo, 1, take, frame))
                a += take
        tail = max(lo, self.N - 1)  # end token and padding: one run on the start/end row
        if hi > tail:
            out.append(Run(tail - lo, 1, hi - tail, T))
        return out

    def positions(self, frame_indices: torch.Tensor) -> torch.Tensor:
        """(t, h, w) RoPE positions of the held tokens, [B, n, 3] long.

        frame_indices: [B, T + 2]. Latent frame k sits at temporal position frame_indices[:, k+1];
        start token at (frame_indices[:, 0], 0, 0), end token at (frame_indices[:, T+1], Hp-1, Wp-1).
        """
        dev = frame_indices.device
        g = torch.arange(self.lo, self.stop, device=dev)
        v = (g - 1).clamp(0, self.T * self.S - 1)
        frame, within = v // self.S, v % self.S
        h, w = within // self.Wp, within % self.Wp
        tidx = frame + 1
        is_start, is_end = (g == 0) | (g >= self.N), g == self.N - 1
        tidx = torch.where(is_start, 0, torch.where(is_end, self.T + 1, tidx))
        h = torch.where(is_start, 0, torch.where(is_end, self.Hp - 1, h))
        w = torch.where(is_start, 0, torch.where(is_end, self.Wp - 1, w))
        t = frame_indices.long()[:, tidx]  # [B, n]
        B = frame_indices.shape[0]
        return torch.stack([t, h.expand(B, -1), w.expand(B, -1)], dim=-1)


@dataclass(frozen=True)
class PackedLayout:
    """Several samples' sequences one after another (a packed micro-batch), and the slice [lo, hi)
    of the whole (right-padded) sequence this module holds; same interface as TokenLayout."""

    samples: tuple[TokenLayout, ...]  # each sample's geometry (their own lo/hi unused)
    lo: int = 0
    hi: int | None = None

    @cached_property
    def bounds(self) -> tuple[int, ...]:
        """Sample k holds tokens [bounds[k], bounds[k+1]); bounds[-1] = N."""
        return (0, *accumulate(s.N for s in self.samples))

    @cached_property
    def row_offsets(self) -> tuple[int, ...]:
        """Sample k's per-frame table rows start at row_offsets[k] (T_j + 1 rows per sample)."""
        return (0, *accumulate(s.T + 1 for s in self.samples))

    @property
    def N(self) -> int:
        return self.bounds[-1]

    @property
    def stop(self) -> int:
        return self.N if self.hi is None else self.hi

    def shard(self, lo: int, hi: int) -> PackedLayout:
        return PackedLayout(self.samples, lo, hi)

    def _pieces(self):
        """(sample k, its TokenLayout shard, local offset of the piece) for the samples the slice
        touches; padding past N goes with the last sample."""
        lo, hi, c, K = self.lo, self.stop, self.bounds, len(self.samples)
        for k, s in enumerate(self.samples):
            a, b = max(lo, c[k]), (hi if k == K - 1 else min(hi, c[k + 1]))
            if a < b:
                yield k, s.shard(a - c[k], b - c[k]), a - lo

    def runs(self) -> list[Run]:
        return [
            Run(r.offset + off, r.frames, r.per_frame, r.row_lo + self.row_offsets[k])
            for k, piece, off in self._pieces()
            for r in piece.runs()
        ]

    def blocks(self) -> list[tuple[int, int, TokenLayout, int]]:
        """(local offset, samples, layout, first table row): consecutive whole samples of one
        geometry as one block (so per-frame work runs batched over them), else one sample's piece."""
        out: list[tuple[int, int, TokenLayout, int]] = []
        for k, piece, off in self._pieces():
            whole = piece.lo == 0 and piece.stop == piece.N
            geo = TokenLayout(piece.T, piece.Hp, piece.Wp)
            if whole and out and out[-1][2] == geo and out[-1][0] + out[-1][1] * geo.N == off:
                out[-1] = (out[-1][0], out[-1][1] + 1, geo, out[-1][3])
            else:
                out.append((off, 1, geo if whole else piece, self.row_offsets[k]))
        return out

    def positions(self, frame_indices: Sequence[torch.Tensor]) -> torch.Tensor:
        """(t, h, w) RoPE positions of the held tokens, [1, n, 3]; frame_indices[k]: [T_k + 2]."""
        parts = [piece.positions(frame_indices[k].view(1, -1)) for k, piece, _ in self._pieces()]
        return torch.cat(parts, dim=1)


def segment_spans(bounds: Sequence[int], lo: int, hi: int) -> list[tuple[int, int, int, int, int]]:
    """Cut query rows [lo, hi) of a packed sequence (sample k at [bounds[k], bounds[k+1])) per
    sample: (q_lo, q_hi, k_lo, k_hi, k) with q relative to lo and the sample's own key rows
    [k_lo, k_hi) global. The spans cover [lo, hi) exactly; rows past the last sample (padding)
    join the last sample's span."""
    K, spans = len(bounds) - 1, []
    for k in range(K):
        a, b = max(lo, bounds[k]), (hi if k == K - 1 else min(hi, bounds[k + 1]))
        if a < b:
            spans.append((a - lo, b - lo, bounds[k], bounds[k + 1], k))
    return spans


def frame_table(x_mask: torch.Tensor, cond: torch.Tensor, cond0: torch.Tensor) -> torch.Tensor:
    """Per-frame conditioning [B, T+1, ...]: cond where x_mask, cond0 elsewhere; row T = cond0."""
    B, T = x_mask.shape
    body = torch.where(x_mask.view(B, T, *([1] * (cond.dim() - 1))), cond.unsqueeze(1), cond0.unsqueeze(1))
    return torch.cat([body, cond0.unsqueeze(1)], dim=1)


def apply_per_frame(
    z: torch.Tensor,
    layout: TokenLayout,
    fn: Callable[..., torch.Tensor],
    *tables: torch.Tensor,
    seq_dim: int = 1,
) -> torch.Tensor:
    """out = fn(z_run, *table_rows) over runs of whole frames, broadcasting rows over tokens.

    z: [B, n, C] (seq_dim=1) or [n, B, C] (seq_dim=0); each table: [B, T+1, C] or [T+1, B, C]
    (frame axis at the same position as z's sequence axis). fn sees z viewed as
    [B, frames, per_frame, C] / [frames, per_frame, B, C] and rows [B, frames, 1, C] /
    [frames, 1, B, C].
    """
    if isinstance(layout, PackedLayout):
        return _apply_packed(z, layout, fn, *tables, seq_dim=seq_dim)
    pieces = []
    for r in layout.runs():
        seg = z.narrow(seq_dim, r.offset, r.frames * r.per_frame)
        shape = list(seg.shape)
        seg = seg.reshape(shape[:seq_dim] + [r.frames, r.per_frame] + shape[seq_dim + 1 :])
        rows = [t.narrow(seq_dim, r.row_lo, r.frames).unsqueeze(seq_dim + 1) for t in tables]
        pieces.append(fn(seg, *rows).flatten(seq_dim, seq_dim + 1))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=seq_dim)


def packed_frame_table(x_masks: Sequence[torch.Tensor], cond: torch.Tensor, cond0: torch.Tensor) -> torch.Tensor:
    """Per-frame conditioning of a packed micro-batch, [F, ...] with F = sum over samples of T_k + 1:
    x_masks[g] [B_g, T_g] for each group of same-shape samples; cond, cond0 [K, ...] per sample in
    the same order (rows of sample k follow PackedLayout.row_offsets)."""
    tables, k = [], 0
    for xm in x_masks:
        b = xm.shape[0]
        tables.append(frame_table(xm, cond[k : k + b], cond0[k : k + b]).flatten(0, 1))
        k += b
    return torch.cat(tables)


def _apply_packed(z, layout: PackedLayout, fn, *tables, seq_dim: int) -> torch.Tensor:
    """apply_per_frame over a packed sequence (batch size 1): a block of b whole samples of one
    geometry is viewed as a batch of b ([b, N, C] with tables [b, T+1, C]); a partial sample
    (at a shard edge) goes alone."""
    pieces = []
    C = z.shape[-1]
    for off, b, lay, row in layout.blocks():
        if b == 1 and (lay.lo or lay.hi is not None):  # a shard of one sample, with its own rows
            n = lay.stop - lay.lo
            rows = [t.narrow(seq_dim, row, lay.T + 1) for t in tables]
            pieces.append(apply_per_frame(z.narrow(seq_dim, off, n), lay, fn, *rows, seq_dim=seq_dim))
            continue
        seg = z.narrow(seq_dim, off, b * lay.N).reshape(b, lay.N, C)  # [b, N, C]
        rows = [t.narrow(seq_dim, row, b * (lay.T + 1)).reshape(b, lay.T + 1, t.shape[-1]) for t in tables]
        out = apply_per_frame(seg, lay, fn, *rows, seq_dim=1)  # [b, N, C']
        pieces.append(out.reshape(*((b * lay.N, 1) if seq_dim == 0 else (1, b * lay.N)), out.shape[-1]))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=seq_dim)
