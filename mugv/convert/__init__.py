"""Checkpoint conversion: Megatron dist checkpoints <-> HF directories / release dit.pt, and verify."""

from mugv.convert.megatron_io import from_hf, to_hf
from mugv.convert.sources import ReleaseSource, parse_config_arg
from mugv.convert.verify import VerifyResult, load_megatron_chunks, megatron_forward, verify

__all__ = [
    "ReleaseSource",
    "VerifyResult",
    "from_hf",
    "load_megatron_chunks",
    "megatron_forward",
    "parse_config_arg",
    "to_hf",
    "verify",
]
