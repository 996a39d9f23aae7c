"""Training-state bytes per rank, LoRA vs full-parameter training, at DP = 1, 2 on gloo.

    python tools/bench_lora_memory.py [--hidden 480] [--depth 8] [--rank 16] [--dp 1 2] [--bf16]

Each run builds the real Trainer (distributed optimizer, EMA), takes one step and counts on
every rank: the DDP gradient buffers (fp32 grad reduction), the optimizer state (the rank's
slices of the fp32 main parameters -- in fp32 without the distributed optimizer, i.e. at DP 1,
these are the weights themselves -- and of the two Adam moments), the EMA, and the model weights. With
LoRA (lora.rank, all seven targets; the base from a from-hf checkpoint of the same model) only
the adapters have gradients, optimizer state and EMA; the weights are the frozen base plus the
adapters. The distributed optimizer shards optimizer state and EMA over DP: those fall as 1/DP,
the gradient buffer does not (every rank reduces the whole buffer).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def measure_worker(rank, world, overrides: list[str]) -> dict:
    from mugv.checkpoint.state import optimizer_slices
    from mugv.config import load_config
    from mugv.training.config import TrainConfig
    from mugv.training.trainer import Trainer

    trainer = Trainer(load_config(TrainConfig, None, overrides))
    trainer.resume()
    trainer.train_step([next(iter(trainer.data))])
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)
    return dict(
        rank=rank,
        grads=nbytes(buf.grad_data for m in trainer.model for buf in m.buffers),
        main=nbytes(s.state["param"] for s in optimizer_slices(trainer.optimizer)),
        adam=nbytes(v for s in optimizer_slices(trainer.optimizer) for k, v in s.state.items() if k != "param"),
        ema=nbytes(trainer.ema.shadow),
        weights=nbytes(p for m in trainer.model for p in m.parameters()),
        trained=sum(p.numel() for m in trainer.model for p in m.parameters() if p.requires_grad),
    )


def base_checkpoint(root: str, hidden: int, depth: int, heads: int) -> str:
    import torch

    from mugv.convert import from_hf
    from mugv.models import MUGDiT, MUGDiTConfig

    out = os.path.join(root, "base")
    torch.manual_seed(0)
    model = MUGDiT(MUGDiTConfig(hidden_size=hidden, depth=depth, num_heads=heads, caption_channels=32))
    model.export_release(os.path.join(root, "base.pt"))
    from_hf(os.path.join(root, "base.pt"), out)
    return out


def main() -> int:
    from mugv.data.synthetic import write_synthetic_dataset
    from tests.dist_harness import run_distributed

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=480)
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dp", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--bf16", action="store_true")
    args = ap.parse_args()
    heads = args.hidden // 48
    root = tempfile.mkdtemp(prefix="bench_lora_")
    MB = 2**20
    try:
        data = os.path.join(root, "ds")
        write_synthetic_dataset(data, {(1, 4, 4): 8}, text_dim=32, text_len=8)
        base = base_checkpoint(root, args.hidden, args.depth, heads)
        print(f"MUGDiT C={args.hidden} depth={args.depth}, LoRA r={args.rank} on all 7 targets, "
              f"{'bf16' if args.bf16 else 'fp32'}, distributed optimizer, EMA; MiB per rank")
        print(f"{'mode':>5} {'DP':>3} {'rank':>4} {'trained params':>15} {'grads':>8} {'main':>8} {'adam m,v':>8} "
              f"{'EMA':>8} {'weights':>8}")
        for dp in args.dp:
            for mode in ("full", "lora"):
                ovr = [f"run_dir={os.path.join(root, f'{mode}{dp}')}", f"data.paths=[{data}]", "data.num_workers=0",
                       "data.token_budget=40", f"model.hidden_size={args.hidden}", f"model.depth={args.depth}",
                       f"model.num_heads={heads}", "model.caption_channels=32", "train.steps=1",
                       "checkpoint.interval=0", "ema.decay=0.9", "logging.tensorboard=false",
                       f"parallel.bf16={str(args.bf16).lower()}"]  # fmt: skip
                if mode == "lora":
                    ovr += [f"lora.rank={args.rank}", f"lora.alpha={args.rank}", f"train.init_from={base}"]
                for r in run_distributed(measure_worker, dp, ovr, timeout=900):
                    print(f"{mode:>5} {dp:>3} {r['rank']:>4} {r['trained']:>15,} {r['grads'] / MB:>8.2f} "
                          f"{r['main'] / MB:>8.2f} {r['adam'] / MB:>8.2f} {r['ema'] / MB:>8.2f} {r['weights'] / MB:>8.2f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
