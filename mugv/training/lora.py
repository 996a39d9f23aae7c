"""Where a LoRA run's weights come from (the trainer's start and resume with lora.rank > 0).

Start (train.init_from, no checkpoint of its own yet):
  * from a full-model checkpoint: it is the frozen base (its EMA if train.init_use_ema); the
    adapters start fresh (B = 0: the run starts from the base model's output);
  * from a LoRA checkpoint with the same adapter settings: its base (as its lora.json says) and
    its adapters (EMA if train.init_use_ema; with train.init_load_optimizer their Adam state too).
Resume: the base named by the run's own lora.json, then adapters, optimizer state and EMA as in
full training. Every checkpoint the run writes carries the same lora.json (mugv.checkpoint.lora).
A full-parameter run refuses a LoRA checkpoint, naming the export that turns one into weights.
"""

from __future__ import annotations

from mugv.checkpoint.checkpointer import load_checkpoint
from mugv.checkpoint.lora import base_checkpoint, lora_record, read_lora_record
from mugv.training.config import TrainConfig
from mugv.utils.logging import get_logger

log = get_logger("train")


def check_no_lora(path: str) -> None:
    """A full-parameter run cannot start from or resume a LoRA checkpoint (it has no base weights)."""
    if read_lora_record(path) is not None:
        raise ValueError(
            f"{path} is a LoRA checkpoint (adapters only) and lora.rank = 0: set the lora.* settings it was "
            "trained with, or export merged weights (mugv convert to-hf --merge-lora, then from-hf) and start from those"
        )


def _check_settings(record: dict, cfg: TrainConfig, path: str) -> None:
    lo = cfg.lora
    have = (record["rank"], float(record["alpha"]), list(record["targets"]))
    if have != (lo.rank, float(lo.alpha), list(lo.targets)):
        raise ValueError(f"{path}: its adapters are rank {have[0]}, alpha {have[1]} on {have[2]}; this run has "
                         f"lora.rank={lo.rank}, lora.alpha={lo.alpha}, lora.targets={list(lo.targets)}")


def _load_base(record: dict, path: str, model) -> None:
    base = base_checkpoint(path, record)
    load_checkpoint(base, model, None, None, use_ema_weights=record["base_ema"], select="frozen")
    log.info(f"frozen base weights from {base} ({'EMA' if record['base_ema'] else 'raw'} weights)")


def resume_base(cfg: TrainConfig, path: str, model) -> dict:
    """Before resuming a LoRA run from its checkpoint `path`: load the base it names; its record."""
    record = read_lora_record(path)
    if record is None:
        raise ValueError(f"{path} has no lora.json: not a LoRA checkpoint, but lora.rank = {cfg.lora.rank}")
    _check_settings(record, cfg, path)
    _load_base(record, path, model)
    return record


def start_from(cfg: TrainConfig, path: str, model, optimizer=None) -> dict:
    """A LoRA run's start from train.init_from (resolved to `path`); returns its lora.json record.
    `optimizer`: also take the adapters' optimizer state (a LoRA checkpoint only)."""
    t, lo = cfg.train, cfg.lora
    record = read_lora_record(path)
    if record is None:
        if optimizer is not None:
            raise ValueError(f"train.init_load_optimizer with lora: {path} is a full-model checkpoint, whose "
                             "optimizer state is not the adapters'; set train.init_load_optimizer=false")
        record = lora_record(path, t.init_use_ema, lo.rank, lo.alpha, lo.dropout, lo.targets)
        _load_base(record, path, model)
        return record
    _check_settings(record, cfg, path)
    _load_base(record, path, model)
    load_checkpoint(path, model, optimizer, None, use_ema_weights=t.init_use_ema, select="trainable")
    log.info(f"adapters from the LoRA checkpoint {path} ({'EMA' if t.init_use_ema else 'raw'})")
    return {**record, "dropout": float(lo.dropout)}
