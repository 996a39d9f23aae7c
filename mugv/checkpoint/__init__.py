"""Checkpoints: the format (FORMAT.md), the locator, per-rank saving and loading, and whole-tensor
access for conversion and sampling. Imports point one way: models, parallel <- checkpoint <-
training <- convert, sampling."""

from mugv.checkpoint.locate import (
    COMPLETE,
    MODEL_CONFIG,
    is_complete,
    latest_checkpoint,
    read_model_config,
    resolve,
    step_dir_name,
)

__all__ = [
    "COMPLETE",
    "MODEL_CONFIG",
    "is_complete",
    "latest_checkpoint",
    "read_model_config",
    "resolve",
    "step_dir_name",
]
