"""Checkpoint save / load at DP = 1, 2, 4 on gloo: seconds, bytes written and host memory per rank.

    python tools/bench_checkpoint.py [--hidden 512] [--depth 8] [--dp 1 2 4] [--dir DIR]

Each layout trains a MUGDiT one step (fp32, distributed optimizer, EMA: 20 bytes of training
state per parameter: weights, fp32 main copy, two Adam moments, EMA), saves a checkpoint and
loads it back into zeroed state, checking every rank's state comes back bit for bit. Per rank it
prints: save and load seconds, the bytes the rank wrote, and its peak host memory (RSS, sampled)
above its training baseline during the save and the load, also as a multiple of its own share
(the bytes it wrote). With the distributed optimizer every figure should fall as 1/DP.
Integrity: the part of the save spent checksumming the files the rank wrote (`sum s`), and the
part of the load spent verifying the rank's share of the files (`verify s`, `verified MB`; rank
k reads the files of writers r with r % DP == k), each timed again on its own after the save and
the load (the files are in the page cache, as they are right after a save).
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402


def _state(trainer) -> list[torch.Tensor]:
    """This rank's training state tensors (fp32 main params and moments, EMA, weights)."""
    from mugv.checkpoint.state import optimizer_slices

    out = [t for s in optimizer_slices(trainer.optimizer) for t in s.state.values()]
    out += list(trainer.ema.shadow) if trainer.ema is not None else []
    return out + [p.data for m in trainer.model for p in m.parameters()]


def measure_worker(rank, world, overrides: list[str]) -> dict:
    """Train one step, save (measured), zero the state, load (measured), compare."""
    import torch.distributed as dist

    from mugv.checkpoint.checkpointer import load_checkpoint
    from mugv.config import load_config
    from mugv.training.config import TrainConfig
    from mugv.training.trainer import Trainer
    from mugv.utils.memory import PeakRSS

    trainer = Trainer(load_config(TrainConfig, None, overrides))
    trainer.metrics = trainer.make_metrics()
    trainer.train_step([next(iter(trainer.data))])
    trainer.step = 1
    before = [t.clone() for t in _state(trainer)]
    gc.collect()
    dist.barrier()
    t0 = time.perf_counter()
    with PeakRSS() as save_mem:
        path = trainer.ckpt.save(1, trainer.model, trainer.optimizer, trainer.ema, trainer.common_state())
    save_s = time.perf_counter() - t0
    with torch.no_grad():
        for t in _state(trainer):
            t.zero_()
    gc.collect()
    dist.barrier()
    t0 = time.perf_counter()
    with PeakRSS() as load_mem:
        load_checkpoint(path, trainer.model, trainer.optimizer, trainer.ema)
    load_s = time.perf_counter() - t0
    exact = all(torch.equal(a, b) for a, b in zip(before, _state(trainer)))
    from mugv.checkpoint.integrity import assigned, checksums, own_files, recorded, verify_collective

    t0 = time.perf_counter()
    checksums(path, own_files(path, rank))  # what the save did after writing
    sum_s = time.perf_counter() - t0
    dist.barrier()
    t0 = time.perf_counter()
    verify_collective(path)  # what the load did before reading
    verify_s = time.perf_counter() - t0
    files = recorded(path)
    verified = sum(files[n]["bytes"] for n in assigned(files, rank, world))
    params = sum(p.numel() for m in trainer.model for p in m.parameters())
    return dict(rank=rank, path=path, params=params, save_s=save_s, load_s=load_s, save_extra=save_mem.extra,
                load_extra=load_mem.extra, exact=exact,
                sum_s=sum_s, verify_s=verify_s, verified=verified)


def run(dp: int, root: str, hidden: int, depth: int) -> list[dict]:
    from mugv.checkpoint.locate import bytes_written_by_rank
    from mugv.data.synthetic import write_synthetic_dataset
    from tests.dist_harness import run_distributed

    data = os.path.join(root, "ds")
    if not os.path.isdir(data):
        write_synthetic_dataset(data, {(1, 4, 4): 8}, text_dim=32, text_len=8)
    overrides = [
        f"run_dir={os.path.join(root, f'dp{dp}')}", f"data.paths=[{data}]", "data.num_workers=0",
        "data.token_budget=40", f"model.hidden_size={hidden}", f"model.depth={depth}", f"model.num_heads={hidden // 48}",
        "model.caption_channels=32", "train.steps=1", "checkpoint.interval=0", "ema.decay=0.9",
        "logging.tensorboard=false",
    ]
    results = run_distributed(measure_worker, dp, overrides, timeout=900)
    written = bytes_written_by_rank(results[0]["path"])
    for r in results:
        r["bytes"] = written.get(r["rank"], 0)
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=480)
    ap.add_argument("--depth", type=int, default=8)
    ap.add_argument("--dp", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--dir", default="")
    args = ap.parse_args()
    root = args.dir or tempfile.mkdtemp(prefix="bench_ckpt_")
    MB = 2**20
    print(f"{'DP':>3} {'rank':>4} {'save s':>7} {'load s':>7} {'written MB':>11} {'save +MB':>9} "
          f"{'x share':>7} {'load +MB':>9} {'x share':>7} {'sum s':>6} {'verify s':>8} {'verified MB':>11} exact")
    try:
        for dp in args.dp:
            for r in run(dp, root, args.hidden, args.depth):
                share = max(r["bytes"], 1)
                print(f"{dp:>3} {r['rank']:>4} {r['save_s']:>7.2f} {r['load_s']:>7.2f} {r['bytes'] / MB:>11.1f} "
                      f"{r['save_extra'] / MB:>9.1f} {r['save_extra'] / share:>7.2f} {r['load_extra'] / MB:>9.1f} "
                      f"{r['load_extra'] / share:>7.2f} {r['sum_s']:>6.3f} {r['verify_s']:>8.3f} "
                      f"{r['verified'] / MB:>11.1f} {r['exact']}")
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
