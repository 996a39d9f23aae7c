"""Load a typed dataclass config from YAML files and `a.b=c` overrides.

Every setting of mugv lives in a dataclass. `load_config(Cls, "x.yaml", ["optim.lr=1e-4"])`
merges the file and the overrides onto the dataclass defaults with OmegaConf's structured
configs, so an unknown key or a value of the wrong type fails here, at load time, with the
key and the file named. The result is a plain dataclass instance; if it defines
`validate()`, that runs once, last.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A config file or override that does not match its schema."""


def _describe(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None)
    msg = str(err).splitlines()[0]
    return f"key '{key}': {msg}" if key else msg


def load_config(cls: type[T], path: str | os.PathLike | None = None, overrides: Sequence[str] = ()) -> T:
    """Build `cls` from defaults <- YAML file <- dotlist overrides, then validate."""
    merged = OmegaConf.structured(cls)
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        except OmegaConfBaseException as err:
            raise ConfigError(f"{path}: {_describe(err)}") from None
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"override {bad[0]!r} is not of the form key=value")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        except OmegaConfBaseException as err:
            raise ConfigError(f"command-line override: {_describe(err)}") from None
    try:
        obj = OmegaConf.to_object(merged)
    except OmegaConfBaseException as err:
        where = path if path is not None else "config"
        raise ConfigError(f"{where}: {_describe(err)}") from None
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ValueError as err:
            where = f"{path}: " if path is not None else ""
            raise ConfigError(f"{where}{err}") from None
    return obj


def to_dict(obj: Any) -> dict:
    """A dataclass config as plain nested dicts/lists (for JSON/YAML dumps)."""
    return OmegaConf.to_container(OmegaConf.structured(obj), resolve=True)


def save_config(obj: Any, path: str | os.PathLike) -> None:
    """Write a resolved config as YAML, atomically."""
    if not dataclasses.is_dataclass(obj):
        raise TypeError(f"save_config expects a dataclass instance, got {type(obj).__name__}")
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(OmegaConf.to_yaml(OmegaConf.structured(obj)))
    os.replace(tmp, path)
