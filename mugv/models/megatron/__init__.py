"""MUGDiT on Megatron-Core: config, layer specs (local / Transformer Engine), model chunks and
the release <-> Megatron weight map.

The names below load megatron.core on first use, so that importing a light submodule (the weight
map's tables, which config validation reads) does not pay for it: `mugv train` rejects a bad
config before Megatron-Core is imported."""

from importlib import import_module

_EXPORTS = {
    "MUGDiTTransformerConfig": "config",
    "megatron_config": "config",
    "MUGDiTMegatron": "model",
    "build_model_chunks": "model",
    "packed_sequence_length": "model",
    "padded_sequence_length": "model",
    "get_layer_spec": "spec",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
