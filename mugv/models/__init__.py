"""MUGDiT models: the release-layout reference model (and, with Megatron, the parallel one)."""

from mugv.models.mugdit import PRESETS, MUGDiT, MUGDiTConfig

__all__ = ["MUGDiT", "MUGDiTConfig", "PRESETS"]
