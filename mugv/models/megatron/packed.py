"""Block-diagonal attention over a packed sequence: each sample's query rows attend only its own
key rows (mugv.models.layout.segment_spans), with no mask materialised.

    outs = attend_spans(q, k, v, spans)   # q [1, h, nq, D], k/v [1, h, nk, D] -> [1, h, n_s, D] pieces

On CPU (and wherever flash-attn is missing) each span is one torch SDPA call on views of q, k, v.
On CUDA with flash-attn installed and half-precision inputs, one variable-length kernel call
(`flash_attn_varlen_func`, imported lazily) covers all spans: cumulative query/key lengths from
the spans, keys of consecutive samples being consecutive rows.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache

import torch
import torch.nn.functional as F

Span = tuple[int, int, int, int, int]  # (q_lo, q_hi, k_lo, k_hi, sample)


@lru_cache(maxsize=1)
def _flash_varlen():
    if importlib.util.find_spec("flash_attn") is None:
        return None
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func


def use_varlen(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and _flash_varlen() is not None


def attend_spans(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spans: list[Span], varlen=None) -> list[torch.Tensor]:
    """Pieces of the attention output, in span order (concatenated along dim 2 they are [1, h, nq, D]).
    `varlen`: a flash_attn_varlen_func-like kernel to use instead of per-span SDPA (default: flash-attn
    when it applies)."""
    if varlen is None and use_varlen(q):
        varlen = _flash_varlen()
    if varlen is None or len(spans) == 1:
        return [_sdpa_block(q, k, v, *block) for block in _blocks(spans)]
    return [_varlen(q, k, v, spans, varlen)]


def _blocks(spans: list[Span]) -> list[tuple[int, int, int, int]]:
    """(q_lo, k_lo, samples, length) runs of consecutive whole samples of one length (batched in
    one call), else (q_lo, k_lo, 1, q_len) with the span's key rows given by k_lo..k_lo+k_len."""
    out: list[list[int]] = []
    for a, b, c, d, _ in spans:
        n = b - a
        if n == d - c and out and out[-1][3] == n and out[-1][2] > 0 and out[-1][0] + out[-1][2] * n == a \
                and out[-1][1] + out[-1][2] * n == c:
            out[-1][2] += 1
        elif n == d - c:
            out.append([a, c, 1, n])
        else:  # a partial sample (shard edge) or padding rows: queries and keys differ
            out.append([a, c, -(d - c), n])  # count < 0 marks it: -key length
    return [tuple(o) for o in out]


def _sdpa_block(q, k, v, a: int, c: int, count: int, n: int) -> torch.Tensor:
    """[1, h, rows, D] output of a block of _blocks."""
    if count < 0:  # queries a..a+n against keys c..c-count
        return F.scaled_dot_product_attention(q[:, :, a : a + n], k[:, :, c : c - count], v[:, :, c : c - count])
    if count == 1:
        return F.scaled_dot_product_attention(q[:, :, a : a + n], k[:, :, c : c + n], v[:, :, c : c + n])
    batch = lambda t, lo: t[0, :, lo : lo + count * n].unflatten(1, (count, n)).transpose(0, 1)  # [count, h, n, D]
    out = F.scaled_dot_product_attention(batch(q, a), batch(k, c), batch(v, c))
    return out.transpose(0, 1).flatten(1, 2)[None]  # [1, h, count*n, D]


def _varlen(q, k, v, spans: list[Span], kernel) -> torch.Tensor:
    k0, k1 = spans[0][2], spans[-1][3]  # the spanned samples' keys are rows [k0, k1), in order
    cu_q = [spans[0][0]] + [b for _, b, _, _, _ in spans]
    cu_k = [spans[0][2] - k0] + [d - k0 for _, _, _, d, _ in spans]
    dev = q.device
    as_thd = lambda t: t[0].transpose(0, 1)  # [1, h, n, D] -> [n, h, D] (the kernel's packed layout)
    out = kernel(
        as_thd(q).contiguous(), as_thd(k[:, :, k0:k1]).contiguous(), as_thd(v[:, :, k0:k1]).contiguous(),
        torch.tensor(cu_q, dtype=torch.int32, device=dev), torch.tensor(cu_k, dtype=torch.int32, device=dev),
        max(b - a for a, b, *_ in spans), max(d - c for _, _, c, d, _ in spans),
        dropout_p=0.0, causal=False,
    )  # [nq, h, D]
    return out.transpose(0, 1)[None]  # [1, h, nq, D]
