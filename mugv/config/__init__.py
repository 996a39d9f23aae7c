"""Typed configuration: dataclasses loaded from YAML (with `base:` composition) plus dotlist
overrides, validated once; the packaged configs/ directory."""

from mugv.config.loader import (
    ConfigError,
    find_config,
    load_config,
    packaged_config_dir,
    save_config,
    to_dict,
    to_yaml,
)

__all__ = ["ConfigError", "find_config", "load_config", "packaged_config_dir", "save_config", "to_dict", "to_yaml"]
