"""Where checkpoints are: the one locator that training, conversion and sampling share.

A *checkpoint* is a directory with `complete.json` (written last, when every rank's shards are
on disk) and `model_config.json`. A *checkpoints root* holds `step_XXXXXXXX/` checkpoints and a
`latest` file naming the newest; a *run directory* has its root at `checkpoints/`. `resolve`
accepts any of the three.
"""

from __future__ import annotations

import json
import os
import re
import shutil

from mugv.models.mugdit import MUGDiTConfig
from mugv.utils.logging import get_logger

log = get_logger("checkpoint")
COMPLETE = "complete.json"
MODEL_CONFIG = "model_config.json"  # MUGDiTConfig.to_dict() of the checkpoint's model
LATEST = "latest"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def is_step_dir(name: str) -> bool:
    return _STEP_DIR.match(name) is not None


def is_complete(path: str) -> bool:
    return os.path.isfile(os.path.join(path, COMPLETE))


def step_of(name: str) -> int:
    return int(_STEP_DIR.match(os.path.basename(name)).group(1))


def step_dirs(root: str) -> list[str]:
    """Names of the step directories under root, oldest first (complete or not)."""
    if not os.path.isdir(root):
        return []
    return sorted(n for n in os.listdir(root) if is_step_dir(n))


def write_latest(root: str, name: str | None) -> None:
    """Point `latest` at checkpoint `name` atomically (None: remove it)."""
    pointer = os.path.join(root, LATEST)
    if name is None:
        if os.path.exists(pointer):
            os.remove(pointer)
        return
    with open(pointer + ".tmp", "w") as f:
        f.write(name)
    os.replace(pointer + ".tmp", pointer)


def remove_checkpoint(path: str) -> None:
    """Delete a checkpoint directory, its completion marker first: a removal cut short leaves a
    directory that is not a checkpoint, never a marker without its files."""
    marker = os.path.join(path, COMPLETE)
    if os.path.exists(marker):
        os.remove(marker)
    shutil.rmtree(path, ignore_errors=True)


def set_aside(path: str, why: str) -> str:
    """Rename a checkpoint to `<path>.<why>` (no longer a checkpoint for the locator, kept for a
    look); returns the new path."""
    aside = f"{path}.{why}"
    n = 1
    while os.path.exists(aside):
        aside, n = f"{path}.{why}{n}", n + 1
    os.replace(path, aside)
    return aside


def latest_checkpoint(root: str) -> str | None:
    """The newest complete checkpoint under a checkpoints root (its `latest` file, else a scan)."""
    pointer = os.path.join(root, LATEST)
    if os.path.isfile(pointer):
        with open(pointer) as f:
            name = f.read().strip()
        path = name if os.path.isabs(name) else os.path.join(root, name)
        if is_complete(path):
            return path
        log.warning(f"{pointer} names {path}, which is not a complete checkpoint; scanning")
    complete = [n for n in step_dirs(root) if is_complete(os.path.join(root, n))]
    return os.path.join(root, complete[-1]) if complete else None


def resolve(path: str) -> str:
    """A checkpoint, a checkpoints root or a run directory -> a complete checkpoint directory."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if is_complete(path):
        return path
    for root in (os.path.join(path, "checkpoints"), path):
        found = latest_checkpoint(root)
        if found:
            return found
    raise FileNotFoundError(
        f"{path}: not a complete checkpoint (no {COMPLETE}), and neither it nor its checkpoints/ "
        "holds one"
    )


def bytes_written_by_rank(ckpt_dir: str) -> dict[int, int]:
    """Bytes of tensor data each global rank wrote into a checkpoint (torch_dist files are named
    `__<rank>_<i>.distcp`)."""
    out: dict[int, int] = {}
    for name in os.listdir(ckpt_dir):
        if name.startswith("__") and name.endswith(".distcp"):
            rank = int(name[2:].split("_", 1)[0])
            out[rank] = out.get(rank, 0) + os.path.getsize(os.path.join(ckpt_dir, name))
    return out


def read_model_config(ckpt_dir: str) -> MUGDiTConfig:
    """The MUGDiTConfig a checkpoint was written for."""
    path = os.path.join(ckpt_dir, MODEL_CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{ckpt_dir}: no {MODEL_CONFIG} (the MUGDiTConfig of the checkpoint)")
    with open(path) as f:
        try:
            return MUGDiTConfig.from_dict(json.load(f))
        except (TypeError, ValueError) as err:
            raise ValueError(f"{path}: {err}") from None
