"""Do the data-parallel ranks finish a step together? Bucketed vs packed micro-batches.

    python tools/bench_balance.py [--steps 16] [--microbatches 2] [--hidden 96 --depth 4]

Two gloo ranks (DP = 2), one torch thread each, train the same small Megatron MUGDiT on a
skewed synthetic mix: few long clips whose attention dominates (one fills a micro-batch) and
many small images. Each step is drawn twice from the same data config, once by the bucket
sampler (data.packing=false: a micro-batch is one bucket, each rank draws its own) and once by
the packed sampler (data.packing=true: micro-batches of clips and images dealt by model FLOPs),
in alternation, so load on the shared machine hits both alike. Per rank and step the compute
time is the process CPU time from the step's start to the gradient reduction (where the faster
rank would wait); the per-step ratio slowest / fastest rank is printed per step and summarised
(mean and median over steps) for both samplers, with the planned model-FLOPs ratio beside it.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

CLIP, IMAGE = (8, 32, 64), (1, 8, 16)  # latent T x H x W: 4098 and 66 tokens
BUDGET = 4098  # one clip, or 32 images (max_batch_size)


def make_part(req, dit, g: torch.Generator):
    from mugv.data.batch import LatentBatch

    T, H, W = (int(v) for v in req.bucket.split("x"))
    B, L = len(req.indices), 8
    return LatentBatch(
        latents=torch.randn(B, dit.in_channels, T, H, W, generator=g),
        y=torch.randn(B, 1, L, dit.caption_channels, generator=g), mask=torch.ones(B, L, dtype=torch.bool),
        x_mask=torch.ones(B, T, dtype=torch.bool), fps=torch.full((B,), 24.0),
        frame_indices=torch.arange(T + 2).expand(B, -1), pixel_size=torch.tensor([[8 * H, 8 * W]] * B),
        tasks=list(req.tasks), bucket=req.bucket, ids=[str(i) for i in req.indices], planned=B,
        stream_index=req.stream_index,
    )


def make_batch(req, dit):
    from mugv.data.batch import PackedBatch

    g = torch.Generator().manual_seed(req.stream_index)
    if hasattr(req, "parts"):
        return PackedBatch([make_part(p, dit, g) for p in req.parts], req.stream_index)
    return make_part(req, dit, g)


def worker(rank: int, world: int, args) -> dict:
    import torch.distributed as dist
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from mugv.data.config import DataConfig
    from mugv.data.packed_sampler import PackedBatchSampler
    from mugv.data.sampler import BucketBatchSampler
    from mugv.models.flops import sample_cost
    from mugv.parallel.runtime import init_distributed
    from mugv.training.build import build_megatron_config, build_model, build_optimizer
    from mugv.training.config import ModelConfig, TrainConfig
    from mugv.training.objective import FlowObjective
    from mugv.training.step import DiTForwardStep
    from mugv.training.trainer import sequence_length

    cfg = TrainConfig(model=ModelConfig(preset="mugdit_tiny", hidden_size=args.hidden, depth=args.depth,
                                        num_heads=args.heads, caption_channels=32))
    cfg.ema.decay = 0.0
    ctx = init_distributed(seed=0)
    dit = cfg.model.build()
    mcfg = build_megatron_config(cfg, dit)
    model = build_model(cfg, mcfg, ctx.device)
    optimizer = build_optimizer(cfg, mcfg, model)
    reached = []  # process time when this rank enters the gradient reduction
    finalize = mcfg.finalize_model_grads_func

    def timed_finalize(*a, **k):
        reached.append(time.process_time())
        return finalize(*a, **k)

    mcfg.finalize_model_grads_func = timed_finalize
    clips, images = args.clips, args.images
    buckets = ["x".join(map(str, CLIP))] * clips + ["x".join(map(str, IMAGE))] * images
    tasks = ["t2v"] * clips + ["t2i"] * images
    data = DataConfig(token_budget=BUDGET, max_batch_size=32, seed=args.seed)
    cost = sample_cost(dit, 8)
    samplers = {
        "bucketed": BucketBatchSampler(buckets, tasks, data, rank, world),
        "packed": PackedBatchSampler(buckets, tasks, data, rank, world, args.microbatches, cost),
    }
    streams = {k: iter(s) for k, s in samplers.items()}
    step_fn = DiTForwardStep(FlowObjective(0, 0.0, None))
    out = {k: [] for k in samplers}
    for i in range(args.warmup + args.steps):
        for mode in (("bucketed", "packed") if i % 2 == 0 else ("packed", "bucketed")):
            batches = [make_batch(next(streams[mode]), dit) for _ in range(args.microbatches)]
            flops = sum(cost(*p.latents.shape[2:]) * len(p) for b in batches for p in b.parts)
            for m in model:
                m.zero_grad_buffer()
            optimizer.zero_grad()
            t0 = time.process_time()
            get_forward_backward_func()(
                forward_step_func=step_fn, data_iterator=iter(batches), model=model[0],
                num_microbatches=len(batches), seq_length=max(sequence_length(mcfg, b) for b in batches),
                micro_batch_size=1, forward_only=False,
            )
            compute = reached[-1] - t0
            optimizer.step()
            both = [None] * world
            dist.all_gather_object(both, (compute, flops))
            if i >= args.warmup:
                out[mode].append(both)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--microbatches", type=int, default=2, help="per rank and step")
    p.add_argument("--clips", type=int, default=40, help="samples of the 8x32x64 clip bucket (4098 tokens)")
    p.add_argument("--images", type=int, default=960, help="samples of the 1x8x16 image bucket (66 tokens)")
    p.add_argument("--hidden", type=int, default=48)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    from mugv.parallel.launch import spawn

    res = spawn(worker, 2, args, timeout=3600, threads=1)[0]
    print(f"2 gloo ranks, 1 thread each; C={args.hidden} depth={args.depth}; {args.clips} clips {'x'.join(map(str, CLIP))} "
          f"+ {args.images} images {'x'.join(map(str, IMAGE))}; token budget {BUDGET}; {args.microbatches} micro-batches "
          f"per rank and step; {args.steps} steps each, alternating")
    summary = {}
    for mode, steps in res.items():
        ratios = [max(c for c, _ in s) / min(c for c, _ in s) for s in steps]
        planned = [max(f for _, f in s) / min(f for _, f in s) for s in steps]
        print(f"{mode}: per step slowest/fastest rank CPU time " + " ".join(f"{r:.2f}" for r in ratios))
        summary[mode] = (statistics.mean(ratios), statistics.median(ratios), statistics.mean(planned))
    for mode, (mean, median, planned) in summary.items():
        print(f"{mode:>8s}: per-rank step-time ratio (slowest / fastest rank) mean {mean:.3f}, median {median:.3f}; "
              f"model-FLOPs ratio mean {planned:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
