"""Bytes each rank reads to start a full-parameter run from a LoRA checkpoint (merged weights,
mugv.checkpoint.merged), against a plain start from its base, at TP1 / TP2 / PP2 / TP2xPP2 / DP2 / DP4 on gloo.

    python tools/bench_merged_init.py [--hidden 288] [--depth 4] [--rank 16] [--dir DIR]

The base is a trainer checkpoint written at TP2 (one full-parameter step, EMA on), the LoRA
checkpoint a LoRA run on its EMA at TP2 (all seven targets), as in the curriculum (e_anneal ->
f_sft -> g_dpo). Each layout builds the real Trainer with train.init_from = the LoRA checkpoint and
counts, per rank, the tensor bytes dist_checkpointing reads from the checkpoint files (the saved
chunks a rank's requests overlap; each is read whole) during the merged start, and during a
plain weights-only load of the base into the same chunks. The difference is what merging costs:
the rank's own layers' adapter shards. At TP1 a rank reads the whole model; at PP2 each stage its
own layers (plus the conditioning embedders every stage holds); at TP2 its TP shards plus the
replicated tensors; at DP2 / DP4 each replica about 1/DP of it all (the replicas exchange what
they read). (Checkpoint metadata files are read by every rank and not counted.)
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from contextlib import contextmanager

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


@contextmanager
def bytes_read():
    """Counts the checkpoint bytes this process reads through torch DCP inside the block
    (`counter["bytes"]`): the stored length of every saved item read."""
    from torch.distributed.checkpoint.filesystem import FileSystemReader

    counter = {"bytes": 0}
    original = FileSystemReader.read_data

    def counting(self, plan, planner):
        counter["bytes"] += sum(self.storage_data[item.storage_index].length for item in plan.items)
        return original(self, plan, planner)

    FileSystemReader.read_data = counting
    try:
        yield counter
    finally:
        FileSystemReader.read_data = original


def start_worker(rank, world, overrides: list[str], base: str) -> dict:
    """The merged start (trainer.resume from init_from) and a plain load of the base, bytes read by each."""
    from megatron.core import parallel_state

    from mugv.checkpoint.merged import load_weights
    from mugv.config import load_config
    from mugv.training.config import TrainConfig
    from mugv.training.trainer import Trainer

    trainer = Trainer(load_config(TrainConfig, None, overrides))
    with bytes_read() as merged:
        trainer.resume()
    with bytes_read() as plain:
        load_weights(base, trainer.model, use_ema=True)
    return dict(rank=rank, tp=parallel_state.get_tensor_model_parallel_rank(),
                pp=parallel_state.get_pipeline_model_parallel_rank(), merged=merged["bytes"], plain=plain["bytes"])


def prepare(root: str, hidden: int, depth: int, rank: int) -> tuple[list[str], str, str]:
    """(common overrides, base run, LoRA run): the two checkpoints, written at TP2."""
    from mugv.data.synthetic import write_synthetic_dataset
    from tests.dist_harness import run_distributed
    from tests.trainer_utils import train_worker

    data = os.path.join(root, "ds")
    if not os.path.isdir(data):
        write_synthetic_dataset(data, {(1, 4, 4): 8}, text_dim=32, text_len=8)
    common = [f"data.paths=[{data}]", "data.num_workers=0", "data.token_budget=40", f"model.hidden_size={hidden}",
              f"model.depth={depth}", f"model.num_heads={hidden // 48}", "model.caption_channels=32",
              "train.steps=1", "checkpoint.interval=0", "ema.decay=0.9", "logging.tensorboard=false"]
    base, sft = os.path.join(root, "base"), os.path.join(root, "sft")
    if not os.path.isdir(base):
        run_distributed(train_worker, 2, [*common, f"run_dir={base}", "parallel.tp=2"], timeout=900)
    if not os.path.isdir(sft):
        run_distributed(train_worker, 2, [*common, f"run_dir={sft}", "parallel.tp=2", f"lora.rank={rank}",
                                          f"lora.alpha={rank}", f"train.init_from={base}", "train.init_use_ema=true"],
                        timeout=900)
    return common, base, sft


def run(root: str, hidden: int, depth: int, rank: int, layouts=("tp1", "tp2", "pp2", "tp2pp2", "dp2", "dp4")) -> dict[str, list[dict]]:
    """Per layout, per rank: bytes read by the merged start and by a plain start from the base."""
    from mugv.checkpoint import resolve
    from tests.dist_harness import run_distributed

    common, base, sft = prepare(root, hidden, depth, rank)
    pp2 = ["parallel.pp=2", "train.microbatches=2"]
    settings = {"tp1": (1, []), "tp2": (2, ["parallel.tp=2"]), "pp2": (2, pp2), "tp2pp2": (4, ["parallel.tp=2", *pp2]),
                "dp2": (2, []), "dp4": (4, [])}
    out = {}
    for name in layouts:
        world, extra = settings[name]
        ovr = [*common, f"run_dir={os.path.join(root, 'start_' + name)}", f"train.init_from={sft}",
               "train.init_use_ema=true", *extra]
        out[name] = run_distributed(start_worker, world, ovr, resolve(base), timeout=900)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=288)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dir", default="")
    args = ap.parse_args()
    root = args.dir or tempfile.mkdtemp(prefix="bench_merged_")
    MB = 2**20
    try:
        results = run(root, args.hidden, args.depth, args.rank)
        whole = results["tp1"][0]
        print(f"C={args.hidden}, depth {args.depth}, LoRA rank {args.rank}: a TP1 rank reads "
              f"{whole['plain'] / MB:.2f} MB of base and {(whole['merged'] - whole['plain']) / MB:.3f} MB of adapters")
        print(f"{'layout':>6} {'rank':>4} {'tp':>3} {'pp':>3} {'merged MB':>10} {'plain MB':>9} {'adapters MB':>12} "
              f"{'x TP1 merged':>13}")
        for name, rows in results.items():
            for r in rows:
                print(f"{name:>6} {r['rank']:>4} {r['tp']:>3} {r['pp']:>3} {r['merged'] / MB:>10.2f} "
                      f"{r['plain'] / MB:>9.2f} {(r['merged'] - r['plain']) / MB:>12.3f} "
                      f"{r['merged'] / whole['merged']:>13.3f}")
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
