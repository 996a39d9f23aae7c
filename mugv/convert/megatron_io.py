"""Release/HF weights <-> Megatron checkpoints, through the checkpoint package's whole-tensor access.

A Megatron checkpoint (what the trainer writes, see mugv/checkpoint/FORMAT.md) keys every tensor
by its layout-independent name, so what `from_hf` writes loads at any TP/PP and `to_hf` reads
any checkpoint.

Memory:
  to_hf   reads the checkpoint a batch of tensors at a time (`batch_bytes`) and streams them into
          sharded safetensors; peak ~ batch_bytes + one safetensors shard. A release dit.pt is one
          torch.save of a flat dict, so writing one holds every tensor (stored dtype) at once.
  LoRA    a LoRA checkpoint (adapters only, lora.json) exports either merged (`merge_lora`: its base
          streamed with each adapted weight merged, W + alpha/r * B A; the adapters, small, are
          held whole) or as the adapter alone (`lora_only`: PEFT-style directory, mugv.models.lora).
  from_hf never builds a model; tensors keep their stored dtype, and model.* / ema.* share them.
          Megatron's torch_dist writer stages all of a rank's tensors before writing, so the peak
          is one copy of the weights (a mmap'd dit.pt keeps most of it in the page cache).
"""

from __future__ import annotations

import os
import shutil

from mugv.checkpoint import read_model_config, resolve
from mugv.checkpoint.lora import read_lora_record
from mugv.checkpoint.weights import (
    dist_session,
    iter_merged_weights,
    iter_release_weights,
    read_adapters,
    write_weights_checkpoint,
)
from mugv.convert.sources import ReleaseSource, expected_shapes
from mugv.models.lora import AdapterConfig, save_adapter
from mugv.models.mugdit import CONFIG_NAME, MUGDiTConfig
from mugv.utils.checkpoint_io import save_safetensors_sharded, save_torch_atomic, write_json_atomic
from mugv.utils.logging import get_logger, progress

log = get_logger(__name__)


def to_hf(
    ckpt: str,
    out: str | None = None,
    release: str | None = None,
    ema: bool = False,
    max_shard_bytes: int = 5 * 2**30,
    batch_bytes: int = 2**30,
    merge_lora: bool = False,
    lora_only: bool = False,
) -> str:
    """Megatron checkpoint (or run dir) -> HF directory `out` and/or release `dit.pt` `release`.
    Returns the checkpoint directory that was read. Tensors keep their stored dtype. A LoRA
    checkpoint needs `merge_lora` (merged weights) or `lora_only` (the adapter directory `out`)."""
    if out is None and release is None:
        raise ValueError("to_hf: give an output HF directory, a release dit.pt path, or both")
    ckpt_dir = resolve(ckpt)
    config = read_model_config(ckpt_dir)
    record = read_lora_record(ckpt_dir)
    if merge_lora and lora_only:
        raise ValueError("to_hf: merge_lora and lora_only exclude each other")
    if (merge_lora or lora_only) and record is None:
        raise ValueError(f"{ckpt_dir} is not a LoRA checkpoint (no lora.json): export it without --merge-lora / --lora-only")
    if record is not None and not (merge_lora or lora_only):
        raise ValueError(f"{ckpt_dir} is a LoRA checkpoint (adapters only): pass --merge-lora (the base with the "
                         "adapters merged) or --lora-only (the adapter as a PEFT-style directory)")
    if lora_only:
        if release is not None or out is None:
            raise ValueError("--lora-only writes an adapter directory (--out), not a release dit.pt")
        log.info("exporting the %s adapter of %s -> %s", "EMA" if ema else "raw", ckpt_dir, out)
        with dist_session():
            tensors = read_adapters(ckpt_dir, config, record, ema)
        save_adapter(out, tensors, AdapterConfig(record["rank"], record["alpha"], tuple(record["targets"]),
                                                 record.get("dropout", 0.0), record["base"]))
        return ckpt_dir
    if record is not None:
        weights = lambda: iter_merged_weights(ckpt_dir, config, record, ema, batch_bytes)
    else:
        weights = lambda: iter_release_weights(ckpt_dir, config, ema, batch_bytes)
    log.info("converting %s (%s weights) -> %s", ckpt_dir, "EMA" if ema else "model", out or release)
    with dist_session():
        if out is not None:
            tensors = weights()
            total = len(expected_shapes(config))
            created = not os.path.exists(out)
            try:
                save_safetensors_sharded(progress(tensors, total, "to-hf tensors"), out, max_shard_bytes)
            except BaseException:  # (a tensor refused, a file that does not verify): no half-written output
                if created:
                    shutil.rmtree(out, ignore_errors=True)
                raise
            write_json_atomic(os.path.join(out, CONFIG_NAME), {"model_type": "mugdit", **config.to_dict()})
        if release is not None:
            # one torch.save: the whole dict is in memory at once (stored dtype, no fp32 copy)
            sd = dict(weights())
            sd = {k: sd.pop(k).contiguous() for k in expected_shapes(config)}  # the model's key order
            parent = os.path.dirname(os.path.abspath(release))
            os.makedirs(parent, exist_ok=True)
            save_torch_atomic(sd, release)
    return ckpt_dir


def from_hf(src: str, out: str, config: MUGDiTConfig | None = None, overwrite: bool = False) -> MUGDiTConfig:
    """HF directory or release dit.pt -> weights-only Megatron checkpoint `out` (model.* and ema.*
    = the same weights)."""
    source = ReleaseSource(src, config)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        if not overwrite:
            raise FileExistsError(f"{out} exists and is not empty (pass overwrite / --overwrite)")
        shutil.rmtree(out)
    log.info("converting %s -> Megatron checkpoint %s (%d tensors)", src, out, len(source.keys()))
    write_weights_checkpoint(source.get, source.config, out, {"converted_from": os.path.abspath(src)})
    return source.config
