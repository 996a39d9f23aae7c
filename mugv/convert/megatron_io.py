"""Release/HF weights <-> Megatron checkpoints, through the checkpoint package's whole-tensor access.

A Megatron checkpoint (what the trainer writes, see mugv/checkpoint/FORMAT.md) keys every tensor
by its layout-independent name, so what `from_hf` writes loads at any TP/PP and `to_hf` reads
any checkpoint.

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

from mugv.checkpoint import read_model_config, resolve
from mugv.checkpoint.weights import dist_session, iter_release_weights, write_weights_checkpoint
from mugv.convert.sources import ReleaseSource, expected_shapes
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
) -> str:
    """Megatron checkpoint (or run dir) -> HF directory `out` and/or release `dit.pt` `release`.
    Returns the checkpoint directory that was read. Tensors keep their stored dtype."""
    if out is None and release is None:
        raise ValueError("to_hf: give an output HF directory, a release dit.pt path, or both")
    ckpt_dir = resolve(ckpt)
    config = read_model_config(ckpt_dir)
    log.info("converting %s (%s weights) -> %s", ckpt_dir, "EMA" if ema else "model", out or release)
    with dist_session():
        if out is not None:
            tensors = iter_release_weights(ckpt_dir, config, ema, batch_bytes)
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
            sd = dict(iter_release_weights(ckpt_dir, config, ema, batch_bytes))
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
