"""`lora.json`: what makes a checkpoint a LoRA checkpoint, and where its frozen base is.

A LoRA run's checkpoints hold only the adapters (`model.*`, `optim.*`, `ema.*` of the
`...lora_A` / `...lora_B` keys). The base weights are read from another checkpoint, named here:

    {"base": "/abs/path/to/base/step_00005000",  # a complete checkpoint (train.init_from, resolved)
     "base_ema": true,                          # its EMA weights are the base (train.init_use_ema)
     "rank": 64, "alpha": 32.0, "dropout": 0.0, "targets": ["qkv", ...]}

A resume, `mugv convert to-hf --merge-lora / --lora-only` and `mugv sample` read the base from
there; if it has moved or gone, they say so and name this file.
"""

from __future__ import annotations

import json
import os

from mugv.checkpoint.locate import is_complete

LORA_RECORD = "lora.json"


def read_lora_record(ckpt_dir: str) -> dict | None:
    """The lora.json of a checkpoint directory, or None for a full-model checkpoint."""
    path = os.path.join(ckpt_dir, LORA_RECORD)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        record = json.load(f)
    missing = [k for k in ("base", "base_ema", "rank", "alpha", "targets") if k not in record]
    if missing:
        raise ValueError(f"{path}: missing {missing}")
    return record


def lora_record(base: str, base_ema: bool, rank: int, alpha: float, dropout: float, targets) -> dict:
    return {"base": os.path.abspath(base), "base_ema": bool(base_ema), "rank": int(rank), "alpha": float(alpha),
            "dropout": float(dropout), "targets": list(targets)}


def base_checkpoint(ckpt_dir: str, record: dict) -> str:
    """The base checkpoint a LoRA checkpoint names; a clear error if it is not there."""
    base = record["base"]
    if not is_complete(base):
        raise FileNotFoundError(
            f"{ckpt_dir} is a LoRA checkpoint (adapters only); its frozen base weights come from {base} "
            f"(recorded in {os.path.join(ckpt_dir, LORA_RECORD)}), which is "
            f"{'not a complete checkpoint' if os.path.isdir(base) else 'missing'}: restore it there "
            "(or edit `base` in that file to where it now is)"
        )
    return base
