"""Checkpoint conversion: Megatron dist checkpoints <-> HF directories / release dit.pt, and verify."""

from mugv.convert.megatron_io import from_hf, iter_checkpoint_release, load_checkpoint_release, to_hf
from mugv.convert.sources import ReleaseSource, parse_config_arg, resolve_checkpoint_dir
from mugv.convert.verify import VerifyResult, load_megatron_chunks, megatron_forward, verify

__all__ = [
    "ReleaseSource",
    "VerifyResult",
    "from_hf",
    "iter_checkpoint_release",
    "load_checkpoint_release",
    "load_megatron_chunks",
    "megatron_forward",
    "parse_config_arg",
    "resolve_checkpoint_dir",
    "to_hf",
    "verify",
]
