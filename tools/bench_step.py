"""Overhead of the Megatron training path over a plain PyTorch loop, same model and batch.

    python tools/bench_step.py [--hidden 576] [--depth 4] [--pairs 7] [--frames 3 --size 16]

One process, one torch thread, TP = PP = CP = DP = 1 (gloo). Both sides start from the same
weights and run the same step on the same micro-batch: rectified-flow noising, forward,
backward, global grad-norm clip, AdamW:
  megatron - mugv.training.build (Megatron config, DDP, optimizer) and Trainer.train_step
             (the forward-backward schedule, grad norm, clip, optimizer step);
  plain    - mugv.models.MUGDiT, DiTForwardStep's inputs, torch.nn.utils.clip_grad_norm_,
             torch.optim.AdamW.
Steps alternate (megatron, plain) so that load on the shared machine hits both alike; each is
timed in process CPU time, and the median of the per-pair ratios megatron / plain is printed
with every pair.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from types import SimpleNamespace

import torch


def make_batch(dit, frames: int, H: int, W: int, text: int, seed: int = 0):
    from mugv.data.batch import LatentBatch

    g = torch.Generator().manual_seed(seed)
    return LatentBatch(
        latents=torch.randn(1, dit.in_channels, frames, H, W, generator=g),
        y=torch.randn(1, 1, text, dit.caption_channels, generator=g),
        mask=torch.ones(1, text, dtype=torch.bool),
        x_mask=torch.ones(1, frames, dtype=torch.bool),
        fps=torch.tensor([24.0]),
        frame_indices=torch.arange(frames + 2)[None],
        pixel_size=torch.tensor([[8 * H, 8 * W]]),
        tasks=["t2v"], bucket=f"{frames}x{H}x{W}", ids=["s0"], planned=1, stream_index=0,
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--frames", type=int, default=3)
    p.add_argument("--size", type=int, default=16, help="latent H = W")
    p.add_argument("--text", type=int, default=64, help="text tokens")
    p.add_argument("--pairs", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args(argv)
    if args.pairs < 1:
        p.error("--pairs must be >= 1")
    torch.set_num_threads(1)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")

    from mugv.checkpoint.keys import unwrap
    from mugv.diffusion import flow_loss
    from mugv.models import MUGDiT
    from mugv.models.megatron.weight_map import release_to_chunk
    from mugv.parallel.runtime import init_distributed
    from mugv.training.build import (
        build_megatron_config,
        build_model,
        build_optimizer,
        use_distributed_optimizer,
    )
    from mugv.training.config import ModelConfig, TrainConfig
    from mugv.training.guards import NonFiniteGuard
    from mugv.training.objective import FlowObjective
    from mugv.training.schedule import LRSchedule
    from mugv.training.step import DiTForwardStep
    from mugv.training.trainer import Trainer

    cfg = TrainConfig(model=ModelConfig(preset="mugdit_1b", hidden_size=args.hidden, depth=args.depth,
                                        num_heads=args.heads))
    cfg.train.text_dropout = 0.0
    cfg.ema.decay = 0.0
    cfg.parallel.validate()
    cfg.parallel.check_model(cfg.model.build())
    ctx = init_distributed(seed=0)
    dit = cfg.model.build()
    torch.manual_seed(0)
    plain = MUGDiT(dit)
    release = {k: v.detach().clone() for k, v in plain.state_dict().items()}
    mcfg = build_megatron_config(cfg, dit)
    model = build_model(cfg, mcfg, ctx.device)
    chunk = unwrap(model[0])
    chunk.load_state_dict(release_to_chunk(release, chunk, 0, 1, dit.num_heads), strict=True)
    optimizer = build_optimizer(cfg, mcfg, model)
    optimizer.reload_model_params()
    step = DiTForwardStep(FlowObjective(0, 0.0, None))
    trainer = SimpleNamespace(
        cfg=cfg, model=model, optimizer=optimizer, mcfg=mcfg, forward_step=step, ema=None, step=0,
        schedule=LRSchedule(cfg.optim, 10**6), guard=NonFiniteGuard(10**6),
    )
    o = cfg.optim
    adamw = torch.optim.AdamW(plain.parameters(), lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
    batch = make_batch(dit, args.frames, args.size, args.size, args.text)

    def megatron_step():
        return Trainer.train_step(trainer, [batch])["loss"]

    def plain_step():
        adamw.zero_grad(set_to_none=True)
        inputs, target = step.objective.noised_inputs(batch)
        loss = flow_loss(plain(**inputs), target, batch.x_mask).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(plain.parameters(), o.clip_grad)
        adamw.step()
        return float(loss)

    for _ in range(args.warmup):
        megatron_step(), plain_step()
    tokens = batch.num_tokens
    print(f"C={args.hidden} depth={args.depth} heads={args.heads} tokens={tokens} text={args.text} "
          f"threads=1 distributed_optimizer={use_distributed_optimizer(cfg)} load {os.getloadavg()[0]:.2f}")
    ratios = []
    for i in range(args.pairs):
        t0 = time.process_time()
        lm = megatron_step()
        t1 = time.process_time()
        lp = plain_step()
        t2 = time.process_time()
        ratios.append((t1 - t0) / (t2 - t1))
        print(f"pair {i}: megatron {t1 - t0:.3f} s (loss {lm:.4f}) | plain {t2 - t1:.3f} s (loss {lp:.4f}) "
              f"| ratio {ratios[-1]:.3f}")
    print(f"median megatron/plain CPU-time ratio over {args.pairs} pairs: {statistics.median(ratios):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
