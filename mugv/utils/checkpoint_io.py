"""Tensor files: sharded safetensors directories and release-style torch.save dicts.

Writes go to a temporary name first and are published with an atomic rename, so an
interrupted save never leaves a half-written file under the final name.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

SAFE_INDEX = "model.safetensors.index.json"
SAFE_SINGLE = "model.safetensors"


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def save_safetensors_sharded(
    tensors: Iterable[tuple[str, torch.Tensor]], directory: str, max_shard_bytes: int = 5 * 2**30
) -> list[str]:
    """Stream (name, tensor) pairs into shards of at most max_shard_bytes (a single tensor may
    exceed it). One shard is written as model.safetensors; more get an index. Returns file names.

    Only one shard's tensors are held at a time, so a generator of tensors keeps memory bounded.
    """
    os.makedirs(directory, exist_ok=True)
    files: list[str] = []
    weight_map: dict[str, str] = {}
    current: dict[str, torch.Tensor] = {}
    size, total = 0, 0

    def flush(last: bool):
        nonlocal current, size
        if not current and not (last and not files):
            return
        name = f"shard-{len(files) + 1:05d}.safetensors"
        tmp = os.path.join(directory, name + ".tmp")
        save_file({k: v.detach().contiguous().cpu() for k, v in current.items()}, tmp, metadata={"format": "pt"})
        files.append(name)
        for k in current:
            weight_map[k] = name
        current, size = {}, 0

    for name, t in tensors:
        if name in weight_map or name in current:
            raise ValueError(f"duplicate tensor name {name!r}")
        if current and size + _nbytes(t) > max_shard_bytes:
            flush(False)
        current[name] = t
        size += _nbytes(t)
        total += _nbytes(t)
    flush(True)
    if len(files) == 1:
        os.replace(os.path.join(directory, files[0] + ".tmp"), os.path.join(directory, SAFE_SINGLE))
        return [SAFE_SINGLE]
    final = []
    for i, f in enumerate(files):
        new = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        os.replace(os.path.join(directory, f + ".tmp"), os.path.join(directory, new))
        final.append(new)
        for k, v in list(weight_map.items()):
            if v == f:
                weight_map[k] = new
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    write_json_atomic(os.path.join(directory, SAFE_INDEX), index)
    return final


def iter_safetensors_dir(directory: str, device: str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) from a directory written by save_safetensors_sharded, one at a time."""
    index = os.path.join(directory, SAFE_INDEX)
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    elif os.path.isfile(os.path.join(directory, SAFE_SINGLE)):
        files = [SAFE_SINGLE]
    else:
        raise FileNotFoundError(f"{directory}: neither {SAFE_SINGLE} nor {SAFE_INDEX} found")
    for fname in files:
        path = os.path.join(directory, fname)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{directory}: shard {fname} listed in the index is missing")
        with safe_open(path, framework="pt", device=device) as f:
            for k in f.keys():
                yield k, f.get_tensor(k)


def load_safetensors_dir(directory: str, device: str = "cpu") -> dict[str, torch.Tensor]:
    return dict(iter_safetensors_dir(directory, device))


def save_torch_atomic(obj, path: str) -> None:
    tmp = f"{path}.tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_release_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Load a release-format `dit.pt`: a flat dict of tensors (weights_only)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"release checkpoint not found: {path}")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (RuntimeError, OSError, EOFError, ValueError) as err:  # truncated or not a torch file
        raise ValueError(f"{path}: cannot be read as a release dit.pt ({type(err).__name__}: {err})") from err
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path}: expected a flat dict of tensors (release dit.pt layout)")
    return sd


def check_finite(tensor: torch.Tensor, name: str, where: str) -> torch.Tensor:
    """The tensor, or ValueError naming it if it holds NaN or Inf (weights to convert or sample)."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise ValueError(f"{where}: {name} has {bad} non-finite value(s) of {tensor.numel()}: refusing to use "
                         "these weights (a diverged or corrupt checkpoint)")
    return tensor


def write_json_atomic(path: str, obj) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)
