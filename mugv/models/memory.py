"""Forward-only (no_grad) activation memory of a MUGDiT: what sampling and training previews need.

DiT activations (no_grad: only the live tensors of one block at a time), per token and batch row,
in bytes, with b = bytes of the compute dtype and C the hidden size: the attention phase holds the
residual x, the modulated input, qkv (3C), rotated q and normed k (b each) and apply_rope's fp32
temporaries for k (12 C bytes, fp32 copy, two half-size products and their stack) plus its
b-byte result; the rotary angles cos/sin (2 x D/2 fp32) live for the whole forward. Attention
itself is O(N) on GPU (flash / memory-efficient kernels). The MLP phase holds x, the modulated
input, fc1 and GELU outputs (4C each): it is smaller. Text tokens are negligible. Measured
against the plain model's forward in tests/test_sample_memory.py.
"""

from __future__ import annotations

import torch


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


def dit_tokens(latent_shape) -> int:
    """Sequence length N = T * ceil(h/2) * ceil(w/2) + 2 of a latent (T, h, w)."""
    T, h, w = latent_shape
    return T * (-(-h // 2)) * (-(-w // 2)) + 2


def dit_activation_bytes(config, latent_shape, batch: int, dtype: torch.dtype) -> int:
    """Largest live activation bytes of one MUGDiT forward of `batch` rows (CFG: 2 x prompts)."""
    b, C, D = dtype_bytes(dtype), config.hidden_size, config.head_dim
    P = 4 * config.out_channels  # final-layer outputs per token
    cast = 0 if b == 4 else 1  # .float() copies (and .to(dtype) casts) unless already fp32
    rope_tmp = 4 * cast + 2 + 2 + 4 + b * cast  # fp32 copy, two half-size results, their stack, cast
    # per token: the patch tokens (b C) stay alive all forward; then the phases of one block
    phases = (
        C * (b + b + b + 3 * b + b + b + rope_tmp) + D * 4,  # tokens, x, h, qkv, q, k, apply_rope(k), cos/sin
        C * (b + b + b + 3 * b + b + b + b + b + b),  # ... q, k, attention out, its reshape, proj
        C * (b + b + b + 4 * b + 4 * b),  # tokens, x, h, fc1, GELU
        C * 4 * b + P * (2 * b + 4 * cast),  # final layer: LN, modulate, linear, unpatchify, .float()
    )
    n = batch * dit_tokens(latent_shape)
    return n * (max(phases) + (D // 2) * 4)  # + the rotary angles [N, D/2] fp32
