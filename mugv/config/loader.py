"""Load a typed dataclass config from YAML files and `a.b=c` overrides.

Every setting of mugv lives in a dataclass. `load_config(Cls, "x.yaml", ["optim.lr=1e-4"])`
merges the file and the overrides onto the dataclass defaults with OmegaConf's structured
configs, so an unknown key or a value of the wrong type fails here, at load time, with the
key and the file named. The result is a plain dataclass instance; if it defines
`validate()`, that runs once, last, and its ValueError comes back as a ConfigError naming the
file.

Composition: a YAML file may start with `base: other.yaml` (relative to the file); the base is
loaded first (itself possibly with a base) and the file's keys are merged over it, mappings key
by key, lists and scalars replaced. Each file is checked against the schema on its own, so an
error names the file that holds the bad key.

Packaged configs: configs/ ships inside the package (mugv/configs). `find_config(path)` returns
`path` when it exists, else the packaged file of that name (`configs/stages/x.yaml` or
`stages/x.yaml`), so `mugv train configs/stages/demo_images.yaml` works from an installed wheel.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")
BASE_KEY = "base"
PACKAGED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


class ConfigError(ValueError):
    """A config file or override that does not match its schema."""


def _describe(err: OmegaConfBaseException) -> str:
    key = getattr(err, "full_key", None)
    msg = str(err).splitlines()[0]
    return f"key '{key}': {msg}" if key else msg


def packaged_config_dir() -> str:
    """The configs/ directory shipped with the package."""
    return PACKAGED


def find_config(path: str | os.PathLike) -> str:
    """`path` if it is a file, else the packaged config of that relative name; ConfigError if neither."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return path
    if not os.path.isabs(path):
        rel = os.path.normpath(path)
        rel = rel[len("configs" + os.sep) :] if rel.startswith("configs" + os.sep) else rel
        packaged = os.path.join(PACKAGED, rel)
        if os.path.isfile(packaged):
            return packaged
    raise ConfigError(f"config file not found: {path} (nor among the packaged configs in {PACKAGED})")


def read_yaml_chain(path: str) -> list[tuple[str, DictConfig]]:
    """[(file, its keys without `base`)] from the innermost base to `path` itself."""
    chain: list[tuple[str, DictConfig]] = []
    seen: list[str] = []
    current: str | None = find_config(path)
    while current is not None:
        real = os.path.realpath(current)
        if real in seen:
            raise ConfigError(f"{current}: `base` chain loops: {' -> '.join([*seen, real])}")
        seen.append(real)
        try:
            node = OmegaConf.load(current)
        except Exception as err:  # a YAML syntax error: name the file
            raise ConfigError(f"{current}: not a valid YAML file ({str(err).splitlines()[0]})") from None
        if not isinstance(node, DictConfig):
            raise ConfigError(f"{current}: expected a mapping of config keys, got a list")
        base = node.pop(BASE_KEY, None)
        chain.append((current, node))
        if base is None:
            current = None
        elif not isinstance(base, str) or not base:
            raise ConfigError(f"{current}: key '{BASE_KEY}' must name a YAML file, got {base!r}")
        else:
            target = base if os.path.isabs(base) else os.path.join(os.path.dirname(current), base)
            if not os.path.isfile(target):
                raise ConfigError(f"{current}: base file not found: {base} (looked for {target})")
            current = target
    return chain[::-1]


def load_config(
    cls: type[T], path: str | os.PathLike | None = None, overrides: Sequence[str] = (), validate: bool = True
) -> T:
    """Build `cls` from defaults <- YAML file (after its bases) <- dotlist overrides, then validate."""
    merged = OmegaConf.structured(cls)
    where = "config"
    if path is not None:
        where = find_config(path)
        for file, node in read_yaml_chain(where):
            try:
                merged = OmegaConf.merge(merged, node)
            except OmegaConfBaseException as err:
                raise ConfigError(f"{file}: {_describe(err)}") from None
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
        raise ConfigError(f"{where}: {_describe(err)}") from None
    check = getattr(obj, "validate", None)
    if validate and callable(check):
        try:
            check()
        except ValueError as err:
            raise ConfigError(f"{where}: {err}") from None
    return obj


def to_dict(obj: Any) -> dict:
    """A dataclass config as plain nested dicts/lists (for JSON/YAML dumps)."""
    return OmegaConf.to_container(OmegaConf.structured(obj), resolve=True)


def to_yaml(obj: Any) -> str:
    """A dataclass config as YAML text."""
    return OmegaConf.to_yaml(OmegaConf.structured(obj))


def save_config(obj: Any, path: str | os.PathLike) -> None:
    """Write a resolved config as YAML, atomically."""
    if not dataclasses.is_dataclass(obj):
        raise TypeError(f"save_config expects a dataclass instance, got {type(obj).__name__}")
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.write(to_yaml(obj))
    os.replace(tmp, path)
