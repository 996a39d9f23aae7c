"""A tiny random T5 encoder + byte-level tokenizer on disk, for tests and the CPU demo."""

from __future__ import annotations

import os

import torch


def make_tiny_t5(
    out_dir: str | os.PathLike,
    d_model: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    seed: int = 0,
) -> str:
    """Write a randomly initialised T5 v1.1-style encoder and a ByT5 tokenizer to `out_dir`.

    ByT5's tokenizer needs no vocabulary file, so the directory is self-contained.
    Returns `out_dir` as a string.
    """
    from transformers import ByT5Tokenizer, T5Config, T5EncoderModel

    if d_model % num_heads:
        raise ValueError(f"d_model {d_model} is not divisible by num_heads {num_heads}")
    out_dir = os.fspath(out_dir)
    tokenizer = ByT5Tokenizer()
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=d_model // num_heads,
        d_ff=2 * d_model,
        num_layers=num_layers,
        num_heads=num_heads,
        feed_forward_proj="gated-gelu",
        is_encoder_decoder=False,
    )
    with torch.random.fork_rng(devices=[]):  # seed locally; the caller's RNG state is kept
        torch.manual_seed(seed)
        model = T5EncoderModel(config)
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
