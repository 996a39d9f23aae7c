"""`mugv train CONFIG [key=value ...]`: one training run (one curriculum stage).

Run it under torchrun for multi-process layouts, or let it start torchrun itself on one
machine with `--nproc N`. `--dry-run` prints the resolved config, the parallel layout, the
parameter count and a per-device memory estimate, and exits without training.
"""

from __future__ import annotations

import os
import subprocess
import sys


def register(sub) -> None:
    p = sub.add_parser("train", help="train a MUGDiT (one stage) from a YAML config")
    p.add_argument("config", help="YAML TrainConfig (see configs/stages/)")
    p.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. optim.lr=1e-4 parallel.tp=2")
    p.add_argument("--nproc", type=int, default=0, help="start torchrun with this many local processes")
    p.add_argument("--dry-run", action="store_true", help="print config, layout and memory estimate; no training")
    p.set_defaults(func=run)


def load(args):
    from mugv.config import load_config
    from mugv.training.config import TrainConfig

    return load_config(TrainConfig, args.config, args.overrides)


def run(args) -> int:
    cfg = load(args)  # fails here, before any process starts, on a bad key or value
    if args.dry_run:
        from mugv.training.plan import describe

        print(describe(cfg, world_size=args.nproc or int(os.environ.get("WORLD_SIZE", "0")) or None))
        return 0
    if args.nproc and "WORLD_SIZE" not in os.environ:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
               "-m", "mugv.cli.main", "train", args.config, *args.overrides]
        return subprocess.call(cmd)
    if "WORLD_SIZE" not in os.environ:  # a plain single-process run: be our own rendezvous
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(_free_port()))
    from mugv.training.trainer import train

    return train(cfg)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
