"""A checkpoint's weights into this rank's chunks, a LoRA checkpoint's as merged weights.

    load_weights(path, model, use_ema)                      # plain chunks: every weight
    load_weights(path, lora_model, use_ema, select="frozen")  # a LoRA model's frozen base

For a full checkpoint this is the weights-only `load_checkpoint`. A LoRA checkpoint (lora.json,
mugv.checkpoint.lora) holds adapters only; its weights are the merged W + alpha/r * B A, which
each rank builds in the model's own sharded layout, with no whole-model tensor anywhere:

  1. the rank loads its share of the base that lora.json names (its EMA if `base_ema`) as any
     weights-only start does -- recursively, since that base may itself be a LoRA checkpoint
     (a LoRA Flow-DPO run's base is the merged SFT model);
  2. it reads the adapters (`model.*`, or their EMA with use_ema) of its own pipeline stage's
     layers only, each cut like its shard of the adapted weight. The weight map's adapter rows
     (weight_map.lora_layer_table) give that cut: a column-parallel weight (qkv and kv rows grouped
     per head, as in the checkpoint's key space) has its rows split over TP and B's rows split the
     same way, A whole; a row-parallel weight has its input columns split, A's columns split the
     same way, B whole. So B_shard @ A_shard is exactly this rank's shard of B A;
  3. it adds alpha/r * B_shard @ A_shard to each adapted weight shard, in fp32, rounded once to the
     parameter dtype (mugv.models.lora.merged_weight, as the merged export). With bf16 parameters
     and an fp32 base the base is rounded when loaded, so the result can differ from loading the
     merged export by one bf16 rounding step.

Bytes read per rank: a weights-only start's plus its own layers' adapter shards, both shared
over the DP x CP replicas (tools/bench_merged_init.py measures them at TP1 / TP2 / PP2 / TP2xPP2 /
DP2 / DP4).
"""

from __future__ import annotations

import torch

from mugv.checkpoint.checkpointer import load_checkpoint, replicated_load_strategy
from mugv.checkpoint.integrity import CheckpointCorruptError, verify_collective
from mugv.checkpoint.keys import global_key, sharded_tensors, unwrap
from mugv.checkpoint.lora import base_checkpoint, read_lora_record
from mugv.models.lora import merged_weight
from mugv.models.megatron.weight_map import chunk_mapping
from mugv.utils.logging import get_logger

log = get_logger("checkpoint")
_MAX_CHAIN = 8  # LoRA checkpoints whose base is a LoRA checkpoint, ...: more is a loop in the lora.json files


def load_weights(path: str, model, use_ema: bool = False, select: str = "all", _chain: tuple = ()) -> None:
    """This rank's share of the weights of checkpoint `path` into the chunks `model` (a LoRA
    checkpoint: merged, see the module doc); `select`: "all" or, for a LoRA model, "frozen".
    Collective over all ranks (dist_checkpointing.load)."""
    record = read_lora_record(path)
    if record is None:
        load_checkpoint(path, model, None, None, use_ema_weights=use_ema, select=select)
        return
    if path in _chain or len(_chain) >= _MAX_CHAIN:
        raise ValueError(f"{path}: the lora.json bases form a loop or a chain longer than {_MAX_CHAIN}: {list(_chain)}")
    base = base_checkpoint(path, record)
    load_weights(base, model, record["base_ema"], select, (*_chain, path))
    merge_adapters(path, model, record, use_ema)
    log.info(f"merged the {'EMA' if use_ema else 'raw'} adapters of {path} into the weights from {base}")


def _adapter_rows(targets):
    """The adapter rows of a chunk's layers (no other parameter)."""
    return lambda chunk: list(chunk_mapping(chunk.layer_offset, len(chunk.layers), False, False, targets, base=False))


def _weight_name(row) -> str:
    """The adapted weight of an adapter row: layers.{j}.<module>.lora_A -> layers.{j}.<module>.weight."""
    return row.megatron.rsplit(".", 1)[0] + ".weight"


@torch.no_grad()
def merge_adapters(path: str, model, record: dict, use_ema: bool = False) -> None:
    """Add the LoRA checkpoint's alpha/r * B A to this rank's shards of the adapted weights of its
    own layers, reading only those adapters' shards (fp32). Collective over all ranks."""
    from megatron.core import dist_checkpointing

    problems = verify_collective(path)  # as load_checkpoint: a corrupt LoRA checkpoint names its bad files
    if problems:
        raise CheckpointCorruptError(path, problems)
    r = int(record["rank"])

    def empty_shard(row, params):  # A [r, in] / B [out, r], cut like this rank's shard of W [out, in]
        w = params[_weight_name(row)]
        shape = (r, w.shape[1]) if row.megatron.endswith(".lora_A") else (w.shape[0], r)
        return torch.empty(shape, dtype=torch.float32, device=w.device)

    prefix = "ema." if use_ema else "model."
    request = sharded_tensors(model, _adapter_rows(record["targets"]), empty_shard, prefix)
    try:
        loaded = dist_checkpointing.load(request, path, sharded_strategy=replicated_load_strategy(path))
    except Exception as err:  # e.g. the EMA of a run without one (ema.decay = 0), or a different model
        hint = " (a run with ema.decay = 0 has none: start from its raw adapters)" if use_ema else ""
        raise RuntimeError(f"{path}: cannot read its {'EMA' if use_ema else 'raw'} LoRA adapters{hint}: {err}") from err
    scale = float(record["alpha"]) / r
    for chunk in model:
        params = dict(unwrap(chunk).named_parameters())
        rows = _adapter_rows(record["targets"])(unwrap(chunk))
        for row_a, row_b in zip(rows[0::2], rows[1::2], strict=True):
            w = params[_weight_name(row_a)]
            a, b = (loaded[prefix + global_key(row)] for row in (row_a, row_b))  # lora_A, lora_B of one weight
            w.copy_(merged_weight(w, a, b, scale))
