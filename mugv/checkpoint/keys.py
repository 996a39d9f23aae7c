"""Layout-independent keys: the dist_checkpointing view of the Megatron MUGDiT chunks.

Every parameter is one ShardedTensor whose key is its *global* Megatron name (layers numbered
0..depth-1 over the whole model, whatever the pipeline split) and whose global shape is the
full tensor in the Megatron layout (QKV / KV rows grouped per head), split over TP along the
axis the weight map gives. A checkpoint written at one TP/PP/CP/DP layout therefore loads at
any other, and a release `dit.pt` can be written straight into this key space (mugv.convert),
with no fixed-TP intermediate.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.dist_checkpointing import ShardedTensor

from mugv.models.megatron.lora import lora_targets
from mugv.models.megatron.weight_map import (
    COLUMN,
    GLOBAL_TABLE,
    KV,
    QKV,
    REPLICATED,
    ROW,
    ParamMap,
    chunk_mapping,
)

TP_AXIS = {COLUMN: 0, QKV: 0, KV: 0, ROW: 1, REPLICATED: None}
_EVERY_STAGE = {name for name, where in GLOBAL_TABLE if where == "every"}


def unwrap(module):
    """The MUGDiTMegatron inside DDP / Float16Module wrappers."""
    while hasattr(module, "module"):
        module = module.module
    return module


def global_key(row: ParamMap) -> str:
    """Layout-independent name: the release layer index with the Megatron parameter name."""
    if not row.release.startswith("blocks."):
        return row.megatron
    layer = row.release.split(".")[1]
    return f"layers.{layer}." + row.megatron.split(".", 2)[2]


def chunk_rows(chunk) -> list[ParamMap]:
    """Weight-map rows of an (unwrapped) chunk's parameters, its LoRA adapters included."""
    return list(chunk_mapping(chunk.layer_offset, len(chunk.layers), chunk.pre_process, chunk.post_process,
                              lora_targets(chunk)))


def model_sharded_state_dict(chunks, prefix: str = "model.") -> dict[str, ShardedTensor]:
    """ShardedTensors of this rank's parameters (the live parameter tensors, so Megatron's
    distributed optimizer can find them), keyed `prefix + global_key`."""
    return sharded_tensors(chunks, chunk_rows, lambda row, params: params[row.megatron], prefix)


def sharded_tensors(chunks, rows_of, tensor_of, prefix: str) -> dict[str, ShardedTensor]:
    """ShardedTensors of this rank for the weight-map rows `rows_of(chunk)` of each (unwrapped) chunk,
    keyed `prefix + global_key`, split over TP and replicated as the row's layout says; their data
    `tensor_of(row, params)` is this rank's TP shard of the row (params: the chunk's parameters)."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp_rank = parallel_state.get_pipeline_model_parallel_rank()
    dp_rank = parallel_state.get_data_parallel_rank(with_context_parallel=True)
    out: dict[str, ShardedTensor] = {}
    for v, wrapped in enumerate(chunks):
        chunk = unwrap(wrapped)
        params = dict(chunk.named_parameters())
        for row in rows_of(chunk):
            key = prefix + global_key(row)
            axis = TP_AXIS[row.layout]
            # copies of a parameter: over TP when not split, over DP always, and over pipeline
            # stages / virtual chunks for the conditioning embedders
            stage_copy = pp_rank * len(chunks) + v if row.release in _EVERY_STAGE else 0
            replica = (stage_copy, tp_rank if axis is None else 0, dp_rank)
            offsets = [] if axis is None else [(axis, tp_rank, tp)]
            entry = key if v == 0 or row.release not in _EVERY_STAGE else f"{key}#chunk{v}"
            out[entry] = ShardedTensor.from_rank_offsets(key, tensor_of(row, params), *offsets, replica_id=replica)
    return out


def load_into_chunks(chunks, loaded: dict[str, torch.Tensor], prefix: str = "model.") -> None:
    """Copy tensors returned by dist_checkpointing.load (same entries as model_sharded_state_dict)
    into the chunks' parameters."""
    template = model_sharded_state_dict(chunks, prefix)
    with torch.no_grad():
        for entry, st in template.items():
            st.data.copy_(loaded[entry])
