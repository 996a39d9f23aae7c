"""Checksums of checkpoint files: computed by each file's writer, recorded in the completion
marker (`complete.json` "files": {name: {"bytes": n, "crc32": "hex"}}), verified on load.

Writers: global rank r writes its tensor data `__<r>_<i>.distcp` and checksums those files
right after writing them (in the background process of an asynchronous save); rank 0 writes and
checksums the small files (`.metadata`, `common.pt`, `metadata.json`, `model_config.json`,
`config.yaml`). Rank 0 gathers every rank's sums into the marker, written last.

Verifying a checkpoint from W ranks (`verify_collective`): rank k checks the files written by
ranks r with r % W == k, rank 0 also the small files -- so every file is read once and no rank
reads more than its share (at the same layout, exactly the files it wrote); the problems are
gathered so every rank sees the same list. `verify(dir, names)` checks files from one process
(`mugv checkpoint verify`, conversion and sampling). A checkpoint whose marker has no "files"
(written before checksums existed) is not verified.
"""

from __future__ import annotations

import json
import os
import zlib

from mugv.checkpoint.locate import COMPLETE
from mugv.utils.checkpoint_io import write_json_atomic

_CHUNK = 16 * 2**20
_SUMS = "checksums_{}.json"  # a rank's sums, from an asynchronous save's writer to its rank
TENSOR_SUFFIX = ".distcp"


class CheckpointCorruptError(RuntimeError):
    """A checkpoint's files do not match the checksums recorded when they were written."""

    def __init__(self, path: str, problems: list[str]):
        self.path, self.problems = path, problems
        shown = "; ".join(problems[:8]) + (f"; ... {len(problems) - 8} more" if len(problems) > 8 else "")
        super().__init__(f"checkpoint {path} does not verify: {shown}")


def writer_of(name: str) -> int | None:
    """The global rank that wrote a tensor file `__<rank>_<i>.distcp`; None for other files."""
    if not (name.startswith("__") and name.endswith(TENSOR_SUFFIX)):
        return None
    try:
        return int(name[2:].split("_", 1)[0])
    except ValueError:
        return None


def own_files(ckpt_dir: str, rank: int) -> list[str]:
    """The tensor files global rank `rank` wrote into ckpt_dir."""
    return sorted(n for n in os.listdir(ckpt_dir) if writer_of(n) == rank)


def file_checksum(path: str) -> dict:
    crc, size = 0, 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return {"bytes": size, "crc32": f"{crc:08x}"}


def checksums(ckpt_dir: str, names: list[str]) -> dict[str, dict]:
    return {n: file_checksum(os.path.join(ckpt_dir, n)) for n in names}


def write_then_checksum(write_fn, ckpt_dir: str, rank: int, *args, **kwargs) -> None:
    """An asynchronous save's writer (a background process): write, then checksum what it wrote."""
    write_fn(*args, **kwargs)
    write_json_atomic(os.path.join(ckpt_dir, _SUMS.format(rank)), checksums(ckpt_dir, own_files(ckpt_dir, rank)))


def read_sums(ckpt_dir: str, rank: int) -> dict:
    path = os.path.join(ckpt_dir, _SUMS.format(rank))
    if not os.path.isfile(path):  # nothing to write on this rank
        return {}
    with open(path) as f:
        sums = json.load(f)
    os.remove(path)
    return sums


def gather_sums(own: dict) -> dict:
    """Every rank's {file: checksum}, merged on rank 0 ({} elsewhere)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return dict(own)
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(own, out, dst=0)
    return {k: v for d in out for k, v in d.items()} if out else {}


def recorded(ckpt_dir: str) -> dict[str, dict] | None:
    """The checksums in the completion marker (None: the marker records none)."""
    with open(os.path.join(ckpt_dir, COMPLETE)) as f:
        return json.load(f).get("files")


def check_file(ckpt_dir: str, name: str, want: dict) -> str | None:
    """None if the file matches its record, else what is wrong (naming the file)."""
    path = os.path.join(ckpt_dir, name)
    if not os.path.isfile(path):
        return f"{path}: missing"
    size = os.path.getsize(path)
    if size != want["bytes"]:
        return f"{path}: {size} bytes, {want['bytes']} were written (truncated or overwritten)"
    got = file_checksum(path)
    if got["crc32"] != want["crc32"]:
        return f"{path}: checksum {got['crc32']} != {want['crc32']} written (the data changed on disk)"
    return None


def verify(ckpt_dir: str, names: list[str] | None = None) -> tuple[list[str], int]:
    """Check `names` (default: every recorded file) from this process: (problems, bytes read)."""
    try:
        files = recorded(ckpt_dir)
    except (OSError, ValueError) as err:
        return [f"{os.path.join(ckpt_dir, COMPLETE)}: unreadable ({err})"], 0
    if files is None:
        return [], 0
    names = sorted(files) if names is None else names
    problems = [p for n in names if (p := check_file(ckpt_dir, n, files[n])) is not None]
    return problems, sum(files[n]["bytes"] for n in names)


def assigned(names, rank: int, world: int) -> list[str]:
    """The files rank `rank` of `world` verifies: tensor files by writer rank modulo world, the
    small files on rank 0."""
    out = []
    for n in names:
        writer = writer_of(n)
        if (writer if writer is not None else 0) % world == rank:
            out.append(n)
    return sorted(out)


def verify_collective(ckpt_dir: str) -> list[str]:
    """Every rank checks its share of the checkpoint's files; all ranks get every problem
    found (collective when torch.distributed is initialised)."""
    import torch.distributed as dist

    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    try:
        files = recorded(ckpt_dir)
        problems = [] if files is None else verify(ckpt_dir, assigned(files, rank, world))[0]
    except (OSError, ValueError) as err:
        problems = [f"{os.path.join(ckpt_dir, COMPLETE)}: unreadable ({err})"]
    if world == 1:
        return problems
    gathered: list = [None] * world
    dist.all_gather_object(gathered, problems)
    return sorted({p for ps in gathered for p in ps})
