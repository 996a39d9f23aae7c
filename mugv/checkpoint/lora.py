"""`lora.json`: what makes a checkpoint a LoRA checkpoint, and where its frozen base is.

A LoRA run's checkpoints hold only the adapters (`model.*`, `optim.*`, `ema.*` of the
`...lora_A` / `...lora_B` keys). The base weights are read from another checkpoint, named here:

    {"base": "/abs/path/to/base/step_00005000",  # a complete checkpoint (train.init_from, resolved)
     "base_relative": "../../../e_anneal/checkpoints/step_00005000",  # the same, from this directory
     "base_ema": true,                          # its EMA weights are the base (train.init_use_ema)
     "rank": 64, "alpha": 32.0, "dropout": 0.0, "targets": ["qkv", ...]}

The base may itself be a LoRA checkpoint: then the base weights are that checkpoint's merged
weights (a LoRA Flow-DPO run started from a LoRA SFT checkpoint; mugv.checkpoint.merged).
A resume, `mugv convert to-hf --merge-lora / --lora-only` and `mugv sample` read the base from
there: `base_relative` first (so a tree of runs moved or copied together, e.g. a curriculum
under a new --root, still finds it), else `base`; if neither is a complete checkpoint they say
so and name this file. (`base_relative` is absent from files written before it existed.)
"""

from __future__ import annotations

import json
import os

from mugv.checkpoint.locate import is_complete, step_dir_name

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


def placed(record: dict, ckpt_root: str) -> dict:
    """The record as written into the step directories under the checkpoints root `ckpt_root`:
    with the base's path relative to them too."""
    here = os.path.join(os.path.abspath(ckpt_root), step_dir_name(0))  # any step directory: all are siblings
    return {**record, "base_relative": os.path.relpath(record["base"], here)}


def base_checkpoint(ckpt_dir: str, record: dict) -> str:
    """The base checkpoint a LoRA checkpoint names (`base_relative` from `ckpt_dir` first, then
    `base`), as an absolute path; a clear error if it is not there."""
    relative = record.get("base_relative")
    if relative is not None:
        moved = os.path.normpath(os.path.join(os.path.abspath(ckpt_dir), relative))
        if is_complete(moved):
            return moved
    base = record["base"]
    if not is_complete(base):
        also = f" nor at {moved}" if relative is not None else ""
        raise FileNotFoundError(
            f"{ckpt_dir} is a LoRA checkpoint (adapters only); its frozen base weights come from {base}{also} "
            f"(recorded in {os.path.join(ckpt_dir, LORA_RECORD)}), which is "
            f"{'not a complete checkpoint' if os.path.isdir(base) else 'missing'}: restore it there "
            "(or edit `base` in that file to where it now is)"
        )
    return base
