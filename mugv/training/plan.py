"""What a config will do, without starting it: layout, parameter counts, a memory estimate per
device, the recompute FLOPs overhead and the MFU ceiling it implies.

Activations come from the layer's own inventory of what it keeps for backward
(mugv.models.megatron.layer.saved_bytes, measured by tests/test_memory_plan.py). Per device, on
the heaviest pipeline stage: the layers of that stage at the configured recompute, the tensors all
its layers share (RoPE angles, text, modulation), the final layer and loss, one extra layer
without recompute as the backward working set (plus, under `full`, the layer being recomputed),
times the micro-batches a 1F1B pipeline keeps in flight on its first stage. A packed micro-batch
(data.packing) holds at most token_budget tokens like a bucketed one, but up to max_batch_size
samples: their text tokens and per-frame rows are counted at that cap. Flow-DPO
(train.objective=flow_dpo) adds the frozen reference copy's weights (mugv.training.reference; with
LoRA the reference is the base with its adapters off: nothing); its forward runs without
gradients, so it keeps no activations, and a micro-batch of pairs holds both clips of each pair
within data.token_budget.

With LoRA (lora.rank > 0) gradients, optimizer state and EMA cover the adapters only (the base is
held in the training dtype, frozen); the line "LoRA ..." prints what full-parameter training would
need at the same layout and the difference.
"""

from __future__ import annotations

import math

import torch
from omegaconf import OmegaConf

from mugv.data.buckets import num_tokens
from mugv.models import MUGDiT, MUGDiTConfig
from mugv.models.flops import attention_kernel_head_dim, block_flops_per_sample, mugdit_flops_per_sample
from mugv.models.megatron.layer import saved_bytes, shared_saved_bytes
from mugv.models.memory import dit_activation_bytes
from mugv.training.config import TrainConfig

GiB = 2**30


def params_per_block(C: int, D: int, mlp_ratio: int) -> int:
    return (4 + 2 * mlp_ratio + 4) * C * C + (15 + 2 * mlp_ratio) * C + 4 * D  # 16C^2 + 21C + 4D at ratio 4


def lora_params_per_block(dit: MUGDiTConfig, targets, rank: int, tp: int = 1) -> int:
    """Adapter parameters of one block on one TP rank: a column-parallel target holds A [r, in]
    whole and B [out/tp, r]; a row-parallel one A [r, in/tp] and B [out, r] whole."""
    C, F = dit.hidden_size, dit.mlp_ratio * dit.hidden_size
    shapes = {"qkv": (C, 3 * C, "col"), "proj": (C, C, "row"), "cross_q": (C, C, "col"), "cross_kv": (C, 2 * C, "col"),
              "cross_proj": (C, C, "row"), "fc1": (C, F, "col"), "fc2": (F, C, "row")}
    return sum(rank * (i + o // tp) if kind == "col" else rank * (i // tp + o)
               for i, o, kind in (shapes[t] for t in targets))


def lora_saved_bytes(cfg: TrainConfig, dit: MUGDiTConfig, tokens: float, text: float) -> float:
    """What the adapters of one layer add to what it keeps for backward: B's input h (r wide; a
    column target's is gathered over the sequence) and, with dropout, the dropped adapter input."""
    p, lo, C = cfg.parallel, cfg.lora, dit.hidden_size
    elem, s = (2 if p.bf16 else 4), (p.tp if p.sequence_parallel and p.tp > 1 else 1)
    row = {"proj", "cross_proj", "fc2"}
    out = 0.0
    for t in lo.targets:
        n = text if t == "cross_kv" else tokens
        out += n * lo.rank * elem / (s if t in row else 1)
        if lo.dropout:
            width = {"fc2": dit.mlp_ratio * C}.get(t, C)
            out += n * width * elem / (p.tp if t in row else (1 if t == "cross_kv" else s))
    return out


def block_bytes(dit: MUGDiTConfig, mode: str | None, elem: int, tokens: int, text_tokens: int, frames: int,
                tp: int = 1, sp: bool = False, cp: int = 1, cp_attention: str = "a2a") -> float:
    """Bytes one layer keeps for backward plus what all layers share, for `tokens` tokens of this
    rank's CP chunk, `text_tokens` real text tokens and `frames` frame rows (T+1 per sample)."""
    C = dit.hidden_size
    layer = saved_bytes(mode, elem, C, dit.num_heads, tp, sp, cp, cp_attention)
    shared = shared_saved_bytes(elem, C, dit.head_dim)
    return layer.total(tokens, text_tokens, frames) + shared.total(tokens, text_tokens, frames)


def stage_sample(cfg: TrainConfig) -> tuple[int, int, int]:
    """A representative latent T, H, W: the largest weighted bucket, else an image of
    token_budget / max_batch_size tokens."""
    buckets = [tuple(int(v) for v in b.split("x")) for b in cfg.data.mix.bucket_weights]
    if buckets:
        return max(buckets, key=lambda s: num_tokens(*s))
    side = 2 * max(1, round(math.sqrt(max(1, cfg.data.token_budget // cfg.data.max_batch_size - 2))))
    return 1, side, side


def recompute_layers(cfg: TrainConfig, dit: MUGDiTConfig) -> int:
    """Layers of each pipeline chunk that `full` recomputes whole (0 without `full`)."""
    p = cfg.parallel
    chunk = dit.depth // (p.pp * (p.vpp or 1))
    return (p.recompute_layers or chunk) if p.recompute == "full" else 0


def activation_bytes(cfg: TrainConfig, dit: MUGDiTConfig, with_lora: bool = True) -> float:
    p, d = cfg.parallel, cfg.data
    elem = 2 if p.bf16 else 4
    sp = p.sequence_parallel and p.tp > 1
    s = p.tp if sp else 1
    tokens = d.token_budget / p.cp  # of this rank's CP chunk, all samples of the micro-batch
    T = stage_sample(cfg)[0]
    samples = max(1, min(d.max_batch_size, d.token_budget // num_tokens(*stage_sample(cfg))))
    frames = samples * (T + 1)
    if d.packing:  # up to max_batch_size samples of any shape within the budget (images: 2 rows each)
        samples = d.max_batch_size
        frames = max(frames, 2 * samples)
    text = samples * d.text_len  # worst case: every caption at the cap
    chunk = dit.depth // (p.pp * (p.vpp or 1))
    chunks_here = p.vpp or 1
    layer = lambda mode: saved_bytes(mode, elem, dit.hidden_size, dit.num_heads, p.tp, sp, p.cp,
                                     p.cp_attention).total(tokens, text, frames)
    n_full = recompute_layers(cfg, dit)
    kept = chunks_here * (n_full * layer("full") + (chunk - n_full) * layer(p.recompute and "selective"))
    shared = chunks_here * shared_saved_bytes(elem, dit.hidden_size, dit.head_dim).total(tokens, text, frames)
    final = tokens * 3 * elem * dit.hidden_size / s + d.token_budget * 4 * 3 * dit.patch_out  # LN/mod/linear in; out, target, loss fp32
    in_flight = min(p.pp, cfg.train.microbatches)
    if p.vpp:
        in_flight *= 1 + (p.pp - 1) / (p.pp * p.vpp)
    working = layer(None) + (layer("selective") if n_full else 0)  # backward working set
    if cfg.lora.rank and with_lora:
        kept += chunks_here * (chunk - n_full) * lora_saved_bytes(cfg, dit, tokens, text)
    return (kept + shared + final) * in_flight + working


def reference_bytes(cfg: TrainConfig, weights: float) -> float:
    """Bytes of the Flow-DPO reference model per device: a frozen copy of this device's weights at
    the same layout and dtype (no gradients, optimizer state or EMA); 0 without DPO, and 0 with
    LoRA (the reference is the same network with its adapters off)."""
    return weights if cfg.train.objective == "flow_dpo" and not cfg.lora.rank else 0.0


def flops_summary(cfg: TrainConfig, dit: MUGDiTConfig) -> tuple[float, float]:
    """(recompute FLOPs as a fraction of the model FLOPs, MFU ceiling): the ceiling counts the
    recomputed forward passes and the attention kernel's head-dim padding as spent, not useful."""
    T, H, W = stage_sample(cfg)
    Lt = cfg.data.text_len
    model = mugdit_flops_per_sample(dit, T, H, W, Lt)
    block = block_flops_per_sample(dit, T, H, W, Lt)
    n_full = recompute_layers(cfg, dit) * cfg.parallel.pp * (cfg.parallel.vpp or 1)
    recompute = n_full * block["forward"]
    D = dit.head_dim
    pad = (attention_kernel_head_dim(D) / D - 1) * 3 * dit.depth * block["attention_core"]
    return recompute / model, model / (model + recompute + pad)


def describe(cfg: TrainConfig, world_size: int | None = None, tokens: int | None = None) -> str:
    dit, p = cfg.model.build(), cfg.parallel
    if tokens:
        cfg.data.token_budget = tokens
    C, L = dit.hidden_size, dit.depth
    block = params_per_block(C, dit.head_dim, dit.mlp_ratio)
    with torch.device("meta"):
        total = sum(t.numel() for t in MUGDiT(dit).parameters())
    outside = total - L * block
    mp = p.tp * p.pp * p.cp
    dp = (world_size // mp) if world_size else None
    # the heaviest pipeline stage holds L/pp blocks (TP-split) plus every non-block parameter
    per_device = L // p.pp * block // p.tp + outside
    w_bytes = 2 if p.bf16 else 4
    # the distributed optimizer shards over DP x CP, and only when that group has > 1 rank
    shard = dp * p.cp if (dp and p.distributed_optimizer and dp * p.cp > 1) else 1
    lo = cfg.lora
    adapters = L // p.pp * lora_params_per_block(dit, lo.targets, lo.rank, p.tp) if lo.rank else 0
    trained = adapters if lo.rank else per_device  # what has gradients, optimizer state and EMA
    per_trained = lambda n: (n * 4, n * (4 * (1 if p.bf16 else 0) + 8) / shard,  # grads; fp32 main (bf16) + Adam m, v
                             n * 4 / shard if cfg.ema.decay > 0 else 0)  # EMA
    weights = (per_device + adapters) * w_bytes
    grads, optim, ema = per_trained(trained)
    ref = reference_bytes(cfg, per_device * w_bytes)
    act = activation_bytes(cfg, dit)
    overhead, ceiling = flops_summary(cfg, dit)
    D = dit.head_dim
    n_full = recompute_layers(cfg, dit)
    lines = [
        OmegaConf.to_yaml(OmegaConf.structured(cfg)).rstrip(),
        "---",
        f"model: {cfg.model.preset}  C={C} depth={L} heads={dit.num_heads}  parameters={total:,}",
        f"layout: tp={p.tp} pp={p.pp}{f' (vpp={p.vpp})' if p.vpp else ''} cp={p.cp} "
        f"dp={dp if dp else f'(world_size/{mp})'}  sp={p.sequence_parallel and p.tp > 1} "
        f"backend={p.backend} bf16={p.bf16} recompute={p.recompute}"
        + (f" ({n_full} of {L // (p.pp * (p.vpp or 1))} layers per chunk full)" if n_full else ""),
        f"parameters per device (heaviest stage): {per_device:,}",
        f"memory estimate per device: weights {weights / GiB:.1f} GiB, grads {grads / GiB:.1f} GiB, "
        f"optimizer {optim / GiB:.1f} GiB, EMA {ema / GiB:.1f} GiB, "
        + (f"DPO reference ({'adapters off' if cfg.lora.rank else 'frozen copy'}) {ref / GiB:.1f} GiB, "
           if cfg.train.objective == "flow_dpo" else "")
        + f"activations ~{act / GiB:.1f} GiB ({cfg.data.token_budget} tokens/micro-batch) -> total "
        f"~{(weights + grads + optim + ema + ref + act) / GiB:.1f} GiB",
        f"recompute FLOPs overhead {overhead:.1%} of model FLOPs; MFU ceiling {ceiling:.1%} "
        f"(recompute and head dim {D} padded to {attention_kernel_head_dim(D)} by the attention kernel "
        f"counted as spent; sample {'x'.join(map(str, stage_sample(cfg)))})",
        f"example: a 720p 5 s clip (14x90x160 latent) is {num_tokens(14, 90, 160)} tokens",
    ]
    if lo.rank:
        total = weights + grads + optim + ema + act
        full = per_device * w_bytes + sum(per_trained(per_device)) + activation_bytes(cfg, dit, with_lora=False)
        lines.insert(-1, f"LoRA r={lo.rank} alpha={lo.alpha} on {','.join(lo.targets)}: {adapters:,} trained parameters "
                     f"per device ({adapters / per_device:.2%}), base frozen; full-parameter training at this layout "
                     f"~{full / GiB:.1f} GiB per device -> LoRA saves ~{(full - total) / GiB:.1f} GiB")
    if cfg.preview.interval > 0 and cfg.preview.prompts:
        lines.append(preview_line(cfg, dit, act))
    return "\n".join(lines)


def preview_line(cfg: TrainConfig, dit, train_act: float) -> str:
    """A preview samples the live model forward-only (no saved activations, no second model):
    its live activations replace the step's, which are freed by then."""
    pv, p = cfg.preview, cfg.parallel
    rows = len(pv.prompts) * (2 if pv.sampler.guidance_scale != 1.0 else 1)  # CFG: cond + uncond
    shards = p.cp * (p.tp if p.sequence_parallel and p.tp > 1 else 1)  # the sequence is split
    dtype = torch.bfloat16 if p.bf16 else torch.float32
    act = dit_activation_bytes(dit, tuple(pv.latent_shape), rows, dtype) / shards
    verdict = "within" if act <= train_act else "ABOVE"
    return (f"preview: {rows} rows of a {'x'.join(map(str, pv.latent_shape))} latent, forward-only: "
            f"~{act / GiB:.2f} GiB of activations per device ({verdict} the training step's "
            f"~{train_act / GiB:.1f} GiB); rank 0 also loads the autoencoder to decode")
