"""Whole-tensor access to a checkpoint's weights from one process: for conversion and sampling.

`iter_release_weights` reads a checkpoint's `model.*` (or `ema.*`) tensors a batch at a time as
full Megatron-layout tensors and yields them in the release layout; `write_weights_checkpoint`
writes a weights-only checkpoint (model and EMA from the same tensors) from release tensors,
with the checksums of its files in `complete.json`. Both run in one process (`dist_session`),
need no model and never hold more than a batch. A read verifies the checkpoint's files first
(every rank's files hold weights and optimizer state, so this reads the whole checkpoint once)
and refuses a tensor with NaN / Inf.

A LoRA checkpoint (lora.json, mugv.checkpoint.lora) holds adapters only: `read_adapters` gives
them in the release layout (PEFT names, mugv.models.lora), `iter_merged_weights` streams its base
with every adapted weight merged (W + alpha/r * B A; a base that is itself a LoRA checkpoint is
merged first); `iter_weights` and `load_release_weights` merge too.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

from mugv.checkpoint.integrity import CheckpointCorruptError, checksums, verify
from mugv.checkpoint.keys import global_key
from mugv.checkpoint.locate import COMPLETE, MODEL_CONFIG, read_model_config, resolve
from mugv.checkpoint.lora import base_checkpoint, read_lora_record
from mugv.models.lora import merged_weight
from mugv.models.megatron.weight_map import ParamMap, full_mapping, merge, split
from mugv.models.mugdit import MUGDiTConfig
from mugv.utils.checkpoint_io import check_finite, write_json_atomic
from mugv.utils.logging import progress

PREFIXES = ("model.", "ema.")


def weight_prefix(ema: bool) -> str:
    return "ema." if ema else "model."


@contextmanager
def dist_session():
    """A single-process gloo group (plus the CPU shim without CUDA) for dist_checkpointing, unless
    torch.distributed is already initialised; torn down on exit."""
    from mugv.parallel import cpu_shims

    if dist.is_initialized():
        yield
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        if torch.cuda.is_available():
            yield
        else:
            with cpu_shims():
                yield
    finally:
        dist.destroy_process_group()


def checkpoint_metadata(ckpt_dir: str) -> dict:
    """{ShardedTensor key: metadata ShardedTensor (global shape, dtype)} of a checkpoint."""
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_tensors_metadata(ckpt_dir)


def read_full(ckpt_dir: str, keys: list[str], meta: dict) -> dict[str, torch.Tensor]:
    """Full (unsharded) tensors for `keys`, read by this process alone."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    request = {
        k: ShardedTensor.from_rank_offsets(k, torch.empty(meta[k].global_shape, dtype=meta[k].dtype), replica_id=0)
        for k in keys
    }
    return dist_checkpointing.load(request, ckpt_dir, validate_access_integrity=False)


def iter_release_weights(
    ckpt_dir: str, config: MUGDiTConfig, ema: bool = False, batch_bytes: int = 2**30,
    rows: list[ParamMap] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (release name, tensor) from a checkpoint, reading `batch_bytes` at a time (the model's
    weights, or the given weight-map rows). Call inside dist_session()."""
    prefix = weight_prefix(ema)
    problems, _ = verify(ckpt_dir)
    if problems:
        raise CheckpointCorruptError(ckpt_dir, problems)
    meta = checkpoint_metadata(ckpt_dir)
    rows = list(full_mapping(config.depth)) if rows is None else rows
    missing = [prefix + global_key(r) for r in rows if prefix + global_key(r) not in meta]
    if missing:
        what = "EMA weights" if ema else "model weights"
        raise KeyError(f"{ckpt_dir}: {len(missing)} {what} missing from the checkpoint, e.g. {missing[:3]}")
    batch, size = [], 0
    for i, row in enumerate(rows):
        key = prefix + global_key(row)
        batch.append(row)
        size += meta[key].dtype.itemsize * torch.Size(meta[key].global_shape).numel()
        if size >= batch_bytes or i == len(rows) - 1:
            loaded = read_full(ckpt_dir, [prefix + global_key(r) for r in batch], meta)
            for r in batch:
                tensor = merge([loaded.pop(prefix + global_key(r))], r.layout, config.num_heads)
                yield r.release, check_finite(tensor, prefix + global_key(r), ckpt_dir)
            batch, size = [], 0


def read_adapters(ckpt_dir: str, config: MUGDiTConfig, record: dict, ema: bool = False) -> dict[str, torch.Tensor]:
    """The adapters of a LoRA checkpoint, release layout and names (blocks.{i}.<module>.lora_A.weight)."""
    rows = list(full_mapping(config.depth, record["targets"], base=False))
    return dict(iter_release_weights(ckpt_dir, config, ema, rows=rows))


def iter_merged_weights(
    ckpt_dir: str, config: MUGDiTConfig, record: dict, ema: bool = False, batch_bytes: int = 2**30
) -> Iterator[tuple[str, torch.Tensor]]:
    """The release weights of a LoRA checkpoint: its base (as lora.json says; merged in turn if that
    is a LoRA checkpoint) with every adapted weight merged, W + alpha/r * B A (fp32, stored dtype);
    `ema`: the adapters' EMA."""
    base = base_checkpoint(ckpt_dir, record)
    if read_model_config(base) != config:
        raise ValueError(f"{ckpt_dir}: its base {base} is a different model ({read_model_config(base)})")
    adapters = read_adapters(ckpt_dir, config, record, ema)
    scale = float(record["alpha"]) / int(record["rank"])
    for name, t in iter_weights(base, config, record["base_ema"], batch_bytes):
        module = name.removesuffix(".weight")
        if f"{module}.lora_A.weight" in adapters:
            t = merged_weight(t, adapters.pop(f"{module}.lora_A.weight"), adapters.pop(f"{module}.lora_B.weight"), scale)
        yield name, t


def iter_weights(ckpt_dir: str, config: MUGDiTConfig, ema: bool = False, batch_bytes: int = 2**30
                 ) -> Iterator[tuple[str, torch.Tensor]]:
    """The release weights of any checkpoint (a LoRA checkpoint's merged). Call inside dist_session()."""
    record = read_lora_record(ckpt_dir)
    if record is not None:
        return iter_merged_weights(ckpt_dir, config, record, ema, batch_bytes)
    return iter_release_weights(ckpt_dir, config, ema, batch_bytes)


def load_release_weights(path: str, ema: bool = False) -> tuple[MUGDiTConfig, dict[str, torch.Tensor]]:
    """The whole release state dict of a checkpoint (or run directory), stored dtype; of a LoRA
    checkpoint, its base with the adapters merged."""
    ckpt = resolve(path)
    config = read_model_config(ckpt)
    with dist_session():
        return config, dict(iter_weights(ckpt, config, ema))


def write_weights_checkpoint(
    get: Callable[[str], torch.Tensor], config: MUGDiTConfig, out: str, marker: dict
) -> None:
    """A weights-only checkpoint at `out` from release tensors `get(release name)`: `model.*` and
    `ema.*` share each tensor. Written to `<out>.partial` and renamed when complete. One process."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    if dist.is_initialized() and dist.get_world_size() > 1:
        raise RuntimeError("write_weights_checkpoint runs in one process; call it outside a multi-rank job")
    state = {}
    rows = list(full_mapping(config.depth))
    for row in progress(rows, total=len(rows), desc="from-hf tensors"):
        tensor = split(get(row.release), row.layout, 0, 1, config.num_heads).contiguous()
        for prefix in PREFIXES:
            key = prefix + global_key(row)
            state[key] = ShardedTensor.from_rank_offsets(key, tensor, replica_id=0)
    tmp = out.rstrip("/") + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    with dist_session():
        dist_checkpointing.save(state, tmp)
    write_json_atomic(os.path.join(tmp, MODEL_CONFIG), config.to_dict())
    files = checksums(tmp, sorted(os.listdir(tmp)))
    write_json_atomic(os.path.join(tmp, COMPLETE), {"step": 0, **marker, "files": files})
    if os.path.isdir(out):
        os.rmdir(out)
    os.replace(tmp, out)
