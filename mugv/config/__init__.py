"""Typed configuration: dataclasses loaded from YAML plus dotlist overrides, validated once."""

from mugv.config.loader import ConfigError, load_config, save_config, to_dict

__all__ = ["ConfigError", "load_config", "save_config", "to_dict"]
