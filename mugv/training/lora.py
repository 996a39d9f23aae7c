"""Where a run's starting weights come from when LoRA is involved (the trainer's start and resume).

A full-parameter run (lora.rank = 0) started from a LoRA checkpoint starts from its merged weights,
W + alpha/r * B A (the base its lora.json names, the adapters' EMA if train.init_use_ema), built per
rank in the model's sharded layout (mugv.checkpoint.merged); its optimizer state (the adapters')
is refused. It may not resume from a LoRA checkpoint (its own checkpoints are full).

A LoRA run (lora.rank > 0) starts (train.init_from, no checkpoint of its own yet):
  * from a full-model checkpoint: it is the frozen base (its EMA if train.init_use_ema); the
    adapters start fresh (B = 0: the run starts from the base model's output);
  * from a LoRA checkpoint, continuing it (train.objective=flow: SFT continued, e.g. the next
    stage): the same adapter settings are required; its base (as its lora.json says) and its
    adapters (EMA if train.init_use_ema; with train.init_load_optimizer their Adam state too);
  * from a LoRA checkpoint with fresh adapters (Flow-DPO: its reference is the network with its
    adapters off, which must be the model the run starts from): the frozen base is that
    checkpoint's merged weights, and this run's lora.json names the LoRA checkpoint as its base.
Resume: the base named by the run's own lora.json (merged, if that is a LoRA checkpoint), then
adapters, optimizer state and EMA as in full training. Every checkpoint the run writes carries
the same lora.json (mugv.checkpoint.lora).
"""

from __future__ import annotations

from mugv.checkpoint.checkpointer import load_checkpoint
from mugv.checkpoint.lora import base_checkpoint, lora_record, read_lora_record
from mugv.checkpoint.merged import load_weights
from mugv.training.config import TrainConfig
from mugv.utils.logging import get_logger

log = get_logger("train")


def check_no_lora(path: str) -> None:
    """A full-parameter run cannot resume from a LoRA checkpoint (its own checkpoints are full)."""
    if read_lora_record(path) is not None:
        raise ValueError(f"{path} is a LoRA checkpoint (adapters only) and lora.rank = 0: a full-parameter run "
                         "cannot resume from it; set the lora.* settings it was trained with")


def full_start(cfg: TrainConfig, path: str, model, optimizer=None) -> None:
    """A full-parameter run's start from train.init_from (resolved to `path`): its weights (a LoRA
    checkpoint's merged weights); `optimizer`: also its optimizer state (a full checkpoint only)."""
    t = cfg.train
    if optimizer is None:
        load_weights(path, model, t.init_use_ema)
        return
    if read_lora_record(path) is not None:
        raise ValueError(f"train.init_load_optimizer: {path} is a LoRA checkpoint, whose optimizer state is its "
                         "adapters', not these parameters'; set train.init_load_optimizer=false")
    load_checkpoint(path, model, optimizer, None, use_ema_weights=t.init_use_ema)


def _check_settings(record: dict, cfg: TrainConfig, path: str) -> None:
    lo = cfg.lora
    have = (record["rank"], float(record["alpha"]), list(record["targets"]))
    if have != (lo.rank, float(lo.alpha), list(lo.targets)):
        raise ValueError(f"{path}: its adapters are rank {have[0]}, alpha {have[1]} on {have[2]}; this run has "
                         f"lora.rank={lo.rank}, lora.alpha={lo.alpha}, lora.targets={list(lo.targets)}")


def _load_base(record: dict, path: str, model) -> str:
    base = base_checkpoint(path, record)
    load_weights(base, model, record["base_ema"], select="frozen")
    log.info(f"frozen base weights from {base} ({'EMA' if record['base_ema'] else 'raw'} weights)")
    return base


def resume_base(cfg: TrainConfig, path: str, model) -> dict:
    """Before resuming a LoRA run from its checkpoint `path`: load the base it names; its record
    (with `base` where the base was found)."""
    record = read_lora_record(path)
    if record is None:
        raise ValueError(f"{path} has no lora.json: not a LoRA checkpoint, but lora.rank = {cfg.lora.rank}")
    _check_settings(record, cfg, path)
    return {**record, "base": _load_base(record, path, model)}


def start_from(cfg: TrainConfig, path: str, model, optimizer=None, fresh: bool = False) -> dict:
    """A LoRA run's start from train.init_from (resolved to `path`); returns its lora.json record.
    `optimizer`: also take the adapters' optimizer state (a LoRA checkpoint continued only).
    `fresh`: a LoRA checkpoint's merged weights are the frozen base of fresh adapters (Flow-DPO)."""
    t, lo = cfg.train, cfg.lora
    record = read_lora_record(path)
    if record is None or fresh:
        if optimizer is not None:
            what = "a full-model checkpoint" if record is None else "a LoRA checkpoint whose adapters this run does not continue"
            raise ValueError(f"train.init_load_optimizer with lora: {path} is {what}; its optimizer state is not "
                             "these adapters'; set train.init_load_optimizer=false")
        load_weights(path, model, t.init_use_ema, select="frozen")
        kind = "merged LoRA checkpoint" if record is not None else "checkpoint"
        log.info(f"frozen base: the {kind} {path} ({'EMA' if t.init_use_ema else 'raw'}); fresh adapters")
        return lora_record(path, t.init_use_ema, lo.rank, lo.alpha, lo.dropout, lo.targets)
    _check_settings(record, cfg, path)
    base = _load_base(record, path, model)
    load_checkpoint(path, model, optimizer, None, use_ema_weights=t.init_use_ema, select="trainable")
    log.info(f"adapters from the LoRA checkpoint {path} ({'EMA' if t.init_use_ema else 'raw'})")
    return {**record, "base": base, "dropout": float(lo.dropout)}
