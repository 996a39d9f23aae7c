"""3D rotary position embedding of MUGDiT (SPEC section 2, "3D RoPE").

Each head's D channels are three equal parts encoding h, w, t (in that order); within a part,
channels (2i, 2i+1) form one complex number rotated by position * f_i with
f_i = theta^(-6i/D), i = 0 .. D/6 - 1, the same frequencies for every axis.
"""

from __future__ import annotations

import torch


def rope_frequencies(head_dim: int, theta: float = 10000.0, device=None) -> torch.Tensor:
    """[D/6] fp32 frequencies."""
    if head_dim % 6:
        raise ValueError(f"3D RoPE needs a head dim divisible by 6, got {head_dim}")
    j = torch.arange(head_dim // 6, dtype=torch.float64, device=device)
    return (theta ** (-6.0 * j / head_dim)).float()


def rope_angles(
    positions: torch.Tensor, head_dim: int, theta: float = 10000.0, max_t: int = 480, max_hw: int = 384
) -> torch.Tensor:
    """positions [..., 3] as (t, h, w) -> angles [..., D/2] fp32, laid out [h | w | t]."""
    t, h, w = positions.unbind(-1)
    if int(h.max()) >= max_hw or int(w.max()) >= max_hw:
        raise ValueError(f"patch grid {int(h.max()) + 1}x{int(w.max()) + 1} exceeds the RoPE table size {max_hw}")
    t = t.clamp(0, max_t - 1)
    f = rope_frequencies(head_dim, theta, positions.device)
    return torch.cat([h[..., None] * f, w[..., None] * f, t[..., None] * f], dim=-1).float()


def apply_rope(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs of x [..., D] by angles broadcastable to [..., D/2].

    The rotation is computed in fp32 and the result cast back to x's dtype."""
    xf = x.float().unflatten(-1, (-1, 2))  # [..., D/2, 2]
    x0, x1 = xf[..., 0], xf[..., 1]
    cos, sin = angles.cos(), angles.sin()
    out = torch.stack([x0 * cos - x1 * sin, x0 * sin + x1 * cos], dim=-1)
    return out.flatten(-2).to(x.dtype)
