"""Release/HF weights <-> Megatron dist_checkpointing checkpoints, in the global key space.

A Megatron checkpoint (what the trainer writes) is a dist_checkpointing (torch_dist) directory of
ShardedTensors keyed `model.<global key>` (and `ema.<global key>`, optimizer state, ...), each a
full Megatron-layout tensor, plus `model_config.json`. Keys and shapes do not depend on the
parallel layout, so what `from_hf` writes loads at any TP/PP and `to_hf` reads any checkpoint.

Memory:
  to_hf   reads the checkpoint a batch of tensors at a time (`batch_bytes`) and streams them into
          sharded safetensors; peak ~ batch_bytes + one safetensors shard. A release dit.pt is one
          torch.save of a flat dict, so writing one holds every tensor (stored dtype) at once.
  from_hf never builds a model; tensors keep their stored dtype, and model.* / ema.* share them.
          Megatron's torch_dist writer stages all of a rank's tensors before writing, so the peak
          is one copy of the weights (a mmap'd dit.pt keeps most of it in the page cache).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

from mugv.convert.sources import (
    MODEL_CONFIG,
    ReleaseSource,
    expected_shapes,
    read_model_config,
    resolve_checkpoint_dir,
)
from mugv.models.megatron.checkpoint import global_key
from mugv.models.megatron.weight_map import full_mapping, merge, split
from mugv.models.mugdit import CONFIG_NAME, MUGDiTConfig
from mugv.utils.checkpoint_io import save_safetensors_sharded, save_torch_atomic, write_json_atomic
from mugv.utils.logging import get_logger

PREFIXES = ("model.", "ema.")
log = get_logger(__name__)


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


def weight_prefix(ema: bool) -> str:
    return "ema." if ema else "model."


# ---------------------------------------------------------------------------------------------
# Megatron checkpoint -> release tensors
# ---------------------------------------------------------------------------------------------


def checkpoint_metadata(ckpt_dir: str) -> dict:
    """{ShardedTensor key: metadata ShardedTensor (global shape, dtype)} of a checkpoint."""
    from megatron.core import dist_checkpointing

    return dist_checkpointing.load_tensors_metadata(ckpt_dir)


def _load_full(ckpt_dir: str, keys: list[str], meta: dict) -> dict[str, torch.Tensor]:
    """Full (unsharded) tensors for `keys`, read by this process alone."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    request = {
        k: ShardedTensor.from_rank_offsets(
            k, torch.empty(meta[k].global_shape, dtype=meta[k].dtype), replica_id=0
        )
        for k in keys
    }
    return dist_checkpointing.load(request, ckpt_dir, validate_access_integrity=False)


def iter_checkpoint_release(
    ckpt_dir: str, config: MUGDiTConfig, ema: bool = False, batch_bytes: int = 2**30
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (release name, tensor) from a Megatron checkpoint, reading `batch_bytes` at a time.
    Call inside dist_session()."""
    prefix = weight_prefix(ema)
    meta = checkpoint_metadata(ckpt_dir)
    rows = list(full_mapping(config.depth))
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
            loaded = _load_full(ckpt_dir, [prefix + global_key(r) for r in batch], meta)
            for r in batch:
                yield r.release, merge([loaded.pop(prefix + global_key(r))], r.layout, config.num_heads)
            batch, size = [], 0


def load_checkpoint_release(path: str, ema: bool = False) -> tuple[MUGDiTConfig, dict[str, torch.Tensor]]:
    """The whole release state dict of a Megatron checkpoint (or run directory), stored dtype."""
    ckpt = resolve_checkpoint_dir(path)
    config = read_model_config(ckpt)
    with dist_session():
        return config, dict(iter_checkpoint_release(ckpt, config, ema))


def to_hf(
    ckpt: str,
    out: str | None = None,
    release: str | None = None,
    ema: bool = False,
    max_shard_bytes: int = 5 * 2**30,
    batch_bytes: int = 2**30,
) -> str:
    """Megatron checkpoint (or run dir) -> HF directory `out` and/or release `dit.pt` `release`.
    Returns the checkpoint directory that was read. Tensors keep their stored dtype."""
    if out is None and release is None:
        raise ValueError("to_hf: give an output HF directory, a release dit.pt path, or both")
    ckpt_dir = resolve_checkpoint_dir(ckpt)
    config = read_model_config(ckpt_dir)
    log.info("converting %s (%s weights) -> %s", ckpt_dir, "EMA" if ema else "model", out or release)
    with dist_session():
        if out is not None:
            tensors = iter_checkpoint_release(ckpt_dir, config, ema, batch_bytes)
            save_safetensors_sharded(tensors, out, max_shard_bytes)
            write_json_atomic(os.path.join(out, CONFIG_NAME), {"model_type": "mugdit", **config.to_dict()})
        if release is not None:
            # one torch.save: the whole dict is in memory at once (stored dtype, no fp32 copy)
            sd = dict(iter_checkpoint_release(ckpt_dir, config, ema, batch_bytes))
            sd = {k: sd.pop(k).contiguous() for k in expected_shapes(config)}  # the model's key order
            parent = os.path.dirname(os.path.abspath(release))
            os.makedirs(parent, exist_ok=True)
            save_torch_atomic(sd, release)
    return ckpt_dir


# ---------------------------------------------------------------------------------------------
# release tensors -> Megatron checkpoint
# ---------------------------------------------------------------------------------------------


def megatron_sharded_state(source: ReleaseSource, prefixes=PREFIXES) -> dict:
    """ShardedTensors of every parameter as one full global tensor (replica 0 of this process),
    under each prefix; all prefixes share the same tensor."""
    from megatron.core.dist_checkpointing import ShardedTensor

    cfg = source.config
    state = {}
    for row in full_mapping(cfg.depth):
        tensor = split(source.get(row.release), row.layout, 0, 1, cfg.num_heads).contiguous()
        for prefix in prefixes:
            key = prefix + global_key(row)
            state[key] = ShardedTensor.from_rank_offsets(key, tensor, replica_id=0)
    return state


def from_hf(src: str, out: str, config: MUGDiTConfig | None = None, overwrite: bool = False) -> MUGDiTConfig:
    """HF directory or release dit.pt -> Megatron checkpoint `out` (model.* and ema.* = the same
    weights, model_config.json, complete.json). Written to `<out>.partial` and renamed when complete."""
    from megatron.core import dist_checkpointing

    if dist.is_initialized() and dist.get_world_size() > 1:
        raise RuntimeError("from_hf writes the checkpoint from one process; call it outside a multi-rank job")
    source = ReleaseSource(src, config)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty (pass overwrite / --overwrite)")
        shutil.rmtree(out)
    tmp = out.rstrip("/") + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    log.info("converting %s -> Megatron checkpoint %s (%d tensors)", src, out, len(source.keys()))
    with dist_session():
        dist_checkpointing.save(megatron_sharded_state(source), tmp)
    write_json_atomic(os.path.join(tmp, MODEL_CONFIG), source.config.to_dict())
    # the trainer's marker of a finished checkpoint (it resolves run dirs / init_from with it)
    write_json_atomic(os.path.join(tmp, "complete.json"), {"step": 0, "converted_from": os.path.abspath(src)})
    if os.path.isdir(out):
        os.rmdir(out)
    os.replace(tmp, out)
    return source.config
