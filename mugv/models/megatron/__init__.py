"""MUGDiT on Megatron-Core: config, layer specs (local / Transformer Engine), model chunks and
the release <-> Megatron weight map."""

from mugv.models.megatron.config import MUGDiTTransformerConfig, megatron_config
from mugv.models.megatron.model import (
    MUGDiTMegatron,
    build_model_chunks,
    packed_sequence_length,
    padded_sequence_length,
)
from mugv.models.megatron.spec import get_layer_spec

__all__ = [
    "MUGDiTMegatron",
    "MUGDiTTransformerConfig",
    "build_model_chunks",
    "get_layer_spec",
    "megatron_config",
    "packed_sequence_length",
    "padded_sequence_length",
]
