"""The one table between the release (`dit.pt` / HF) layout and the Megatron layout.

Every parameter is a row (release name, Megatron name, how it is laid out over TP). Layer rows
use `{i}` for the global layer index on the release side; on the Megatron side a pipeline chunk
numbers its layers locally from 0 (`layers.{j}`, global i = chunk offset + j). Conversion,
resharding and the parity tests all go through `split` / `merge` below.

Layouts:
  replicated  the same tensor on every TP rank
  column      rows split evenly over TP
  row         columns split evenly over TP
  qkv         release rows [all Q; all K; all V] -> Megatron per head [q_h, k_h, v_h], heads split over TP
  kv          release rows [all K; all V]        -> Megatron per head [k_h, v_h], heads split over TP

LoRA adapters (`LORA_TARGETS`) add two rows per adapted linear: A [r, in] and B [out, r], laid out
like the base weight along the axis they share with it -- a column-parallel base (qkv, kv, column)
splits B's rows the same way and replicates A; a row-parallel base splits A's columns and
replicates B. Release names follow PEFT (`blocks.{i}.attn.qkv.lora_A.weight`).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

REPLICATED, COLUMN, ROW, QKV, KV = "replicated", "column", "row", "qkv", "kv"

# (release suffix under blocks.{i}., Megatron suffix under layers.{j}., layout)
LAYER_TABLE: list[tuple[str, str, str]] = [
    ("scale_shift_table", "scale_shift_table", REPLICATED),
    ("attn.qkv.weight", "self_attention.linear_qkv.weight", QKV),
    ("attn.qkv.bias", "self_attention.linear_qkv.bias", QKV),
    ("attn.q_norm.weight", "self_attention.q_layernorm.weight", REPLICATED),
    ("attn.k_norm.weight", "self_attention.k_layernorm.weight", REPLICATED),
    ("attn.proj.weight", "self_attention.linear_proj.weight", ROW),
    ("attn.proj.bias", "self_attention.linear_proj.bias", REPLICATED),
    ("cross_attn_norm.weight", "cross_attn_norm.weight", REPLICATED),
    ("cross_attn_norm.bias", "cross_attn_norm.bias", REPLICATED),
    ("cross_attn.q_linear.weight", "cross_attention.linear_q.weight", COLUMN),
    ("cross_attn.q_linear.bias", "cross_attention.linear_q.bias", COLUMN),
    ("cross_attn.kv_linear.weight", "cross_attention.linear_kv.weight", KV),
    ("cross_attn.kv_linear.bias", "cross_attention.linear_kv.bias", KV),
    ("cross_attn.q_norm.weight", "cross_attention.q_layernorm.weight", REPLICATED),
    ("cross_attn.k_norm.weight", "cross_attention.k_layernorm.weight", REPLICATED),
    ("cross_attn.proj.weight", "cross_attention.linear_proj.weight", ROW),
    ("cross_attn.proj.bias", "cross_attention.linear_proj.bias", REPLICATED),
    ("mlp.fc1.weight", "mlp.linear_fc1.weight", COLUMN),
    ("mlp.fc1.bias", "mlp.linear_fc1.bias", COLUMN),
    ("mlp.fc2.weight", "mlp.linear_fc2.weight", ROW),
    ("mlp.fc2.bias", "mlp.linear_fc2.bias", REPLICATED),
]

# non-layer parameters keep their release names; where they live: first chunk, last chunk, every chunk
_EMBEDDERS = ["t_embedder", "fps_embedder"]
GLOBAL_TABLE: list[tuple[str, str]] = [
    ("start_token", "first"),
    ("end_token", "first"),
    ("x_embedder.proj.weight", "first"),
    ("x_embedder.proj.bias", "first"),
    *[(f"{m}.mlp.{k}.{p}", "every") for m in _EMBEDDERS for k in (0, 2) for p in ("weight", "bias")],
    ("t_block.1.weight", "every"),
    ("t_block.1.bias", "every"),
    ("y_embedder.y_proj.fc1.weight", "every"),
    ("y_embedder.y_proj.fc1.bias", "every"),
    ("y_embedder.y_proj.fc2.weight", "every"),
    ("y_embedder.y_proj.fc2.bias", "every"),
    ("final_layer.scale_shift_table", "last"),
    ("final_layer.linear.weight", "last"),
    ("final_layer.linear.bias", "last"),
]


# LoRA targets: name -> (release module under blocks.{i}., Megatron module under layers.{j}., base layout)
LORA_TARGETS: dict[str, tuple[str, str, str]] = {
    "qkv": ("attn.qkv", "self_attention.linear_qkv", QKV),
    "proj": ("attn.proj", "self_attention.linear_proj", ROW),
    "cross_q": ("cross_attn.q_linear", "cross_attention.linear_q", COLUMN),
    "cross_kv": ("cross_attn.kv_linear", "cross_attention.linear_kv", KV),
    "cross_proj": ("cross_attn.proj", "cross_attention.linear_proj", ROW),
    "fc1": ("mlp.fc1", "mlp.linear_fc1", COLUMN),
    "fc2": ("mlp.fc2", "mlp.linear_fc2", ROW),
}


def lora_layer_table(targets) -> list[tuple[str, str, str]]:
    """(release suffix, Megatron suffix, layout) of the adapter tensors A and B of each target."""
    out = []
    for name in targets:
        if name not in LORA_TARGETS:
            raise ValueError(f"unknown LoRA target {name!r}; known: {list(LORA_TARGETS)}")
        rel, meg, layout = LORA_TARGETS[name]
        a, b = (ROW, REPLICATED) if layout == ROW else (REPLICATED, layout)
        out += [(f"{rel}.lora_A.weight", f"{meg}.lora_A", a), (f"{rel}.lora_B.weight", f"{meg}.lora_B", b)]
    return out


@dataclass(frozen=True)
class ParamMap:
    release: str
    megatron: str  # name inside one pipeline chunk
    layout: str


def chunk_mapping(layer_offset: int, num_layers: int, pre_process: bool, post_process: bool,
                  lora=(), base: bool = True) -> Iterator[ParamMap]:
    """Rows for one pipeline chunk (its layers and the non-layer parameters it holds), with the
    adapter rows of the LoRA targets `lora`; base=False: the adapter rows only."""
    for name, where in GLOBAL_TABLE if base else ():
        if where == "every" or (where == "first" and pre_process) or (where == "last" and post_process):
            yield ParamMap(name, name, REPLICATED)
    table = (LAYER_TABLE if base else []) + lora_layer_table(lora)
    for j in range(num_layers):
        for rel, meg, layout in table:
            yield ParamMap(f"blocks.{layer_offset + j}.{rel}", f"layers.{j}.{meg}", layout)


def full_mapping(depth: int, lora=(), base: bool = True) -> Iterator[ParamMap]:
    """Rows for the whole model as one chunk (PP = 1)."""
    return chunk_mapping(0, depth, True, True, lora, base)


def _per_head(t: torch.Tensor, parts: int, heads: int) -> torch.Tensor:
    """[parts * heads * D, ...] grouped [all part0; all part1; ...] -> grouped per head."""
    rest = t.shape[1:]
    return t.reshape(parts, heads, -1, *rest).transpose(0, 1).reshape(t.shape)


def _per_part(t: torch.Tensor, parts: int, heads: int) -> torch.Tensor:
    rest = t.shape[1:]
    return t.reshape(heads, parts, -1, *rest).transpose(0, 1).reshape(t.shape)


def split(t: torch.Tensor, layout: str, tp_rank: int, tp_size: int, num_heads: int) -> torch.Tensor:
    """Release tensor -> this TP rank's Megatron shard."""
    if layout == REPLICATED:
        return t
    if layout == ROW:
        return t.chunk(tp_size, dim=1)[tp_rank]
    if layout in (QKV, KV):
        t = _per_head(t, 3 if layout == QKV else 2, num_heads)
    elif layout != COLUMN:
        raise ValueError(f"unknown layout {layout!r}")
    if t.shape[0] % tp_size:
        raise ValueError(f"dim 0 of size {t.shape[0]} is not divisible by TP {tp_size}")
    return t.chunk(tp_size, dim=0)[tp_rank]


def merge(shards: list[torch.Tensor], layout: str, num_heads: int) -> torch.Tensor:
    """All TP ranks' Megatron shards (in rank order) -> the release tensor."""
    if layout == REPLICATED:
        return shards[0]
    if layout == ROW:
        return torch.cat(shards, dim=1)
    t = torch.cat(shards, dim=0)
    if layout in (QKV, KV):
        t = _per_part(t, 3 if layout == QKV else 2, num_heads)
    return t


def release_to_chunk(
    release: dict[str, torch.Tensor], chunk, tp_rank: int, tp_size: int, num_heads: int
) -> dict[str, torch.Tensor]:
    """The state dict of one Megatron chunk (MUGDiTMegatron) from a release state dict."""
    from mugv.models.megatron.lora import lora_targets

    rows = chunk_mapping(chunk.layer_offset, len(chunk.layers), chunk.pre_process, chunk.post_process,
                         lora_targets(chunk))
    out = {}
    for r in rows:
        if r.release not in release:
            raise KeyError(f"release state dict has no {r.release!r}")
        out[r.megatron] = split(release[r.release], r.layout, tp_rank, tp_size, num_heads).clone()
    return out
