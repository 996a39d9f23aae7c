"""What a config will do, without starting it: layout, parameter counts and a memory estimate."""

from __future__ import annotations

import torch
from omegaconf import OmegaConf

from mugv.data.buckets import num_tokens
from mugv.models import MUGDiT
from mugv.training.config import TrainConfig


def params_per_block(C: int, D: int, mlp_ratio: int) -> int:
    return (4 + 2 * mlp_ratio + 4) * C * C + (15 + 2 * mlp_ratio) * C + 4 * D  # 16C^2 + 21C + 4D at ratio 4


def describe(cfg: TrainConfig, world_size: int | None = None, tokens: int | None = None) -> str:
    dit, p = cfg.model.build(), cfg.parallel
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
    dp_div = dp if (dp and p.distributed_optimizer) else 1
    weights = per_device * w_bytes
    grads = per_device * 4
    optim = per_device * (4 * (1 if p.bf16 else 0) + 8) / dp_div  # fp32 main copy (bf16) + Adam m, v
    ema = per_device * 4 / dp_div if cfg.ema.decay > 0 else 0
    n_tok = tokens or cfg.data.token_budget
    local_tok = n_tok / (p.cp * (p.tp if p.sequence_parallel and p.tp > 1 else 1))
    # activations kept for backward per layer, bf16: ~ tokens x C x (34 + 5 * heads * tokens / C)
    # without flash attention it is quadratic; with SDPA flash/efficient kernels ~34 bytes/elem.
    act_layer = local_tok * C * 34 * (w_bytes / 2)
    layers_here = L // p.pp
    if p.recompute == "full":
        act = local_tok * C * w_bytes * layers_here + act_layer
    else:
        act = act_layer * layers_here * (0.8 if p.recompute == "selective" else 1.0)
    gib = 2**30
    lines = [
        OmegaConf.to_yaml(OmegaConf.structured(cfg)).rstrip(),
        "---",
        f"model: {cfg.model.preset}  C={C} depth={L} heads={dit.num_heads}  parameters={total:,}",
        f"layout: tp={p.tp} pp={p.pp}{f' (vpp={p.vpp})' if p.vpp else ''} cp={p.cp} "
        f"dp={dp if dp else f'(world_size/{mp})'}  sp={p.sequence_parallel and p.tp > 1} "
        f"backend={p.backend} bf16={p.bf16} recompute={p.recompute}",
        f"parameters per device (heaviest stage): {per_device:,}",
        f"memory estimate per device: weights {weights / gib:.1f} GiB, grads {grads / gib:.1f} GiB, "
        f"optimizer {optim / gib:.1f} GiB, EMA {ema / gib:.1f} GiB, activations ~{act / gib:.1f} GiB "
        f"({n_tok} tokens/micro-batch) -> total ~{(weights + grads + optim + ema + act) / gib:.1f} GiB",
        f"example: a 720p 5 s clip (14x90x160 latent) is {num_tokens(14, 90, 160)} tokens",
    ]
    return "\n".join(lines)
