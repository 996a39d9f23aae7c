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
        return [
            F.scaled_dot_product_attention(q[:, :, a:b], k[:, :, c:d], v[:, :, c:d]) for a, b, c, d, _ in spans
        ]
    return [_varlen(q, k, v, spans, varlen)]


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
