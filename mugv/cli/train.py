"""`mugv train CONFIG [key=value ...]`: one training run (one curriculum stage).

Run it under torchrun, or let it start torchrun itself with `--nproc N` processes on this
machine (on every node of a multi-node job, with NNODES, NODE_RANK, MASTER_ADDR and MASTER_PORT
set; see mugv.parallel.launch). `--dry-run` prints the resolved config, the parallel layout, the
parameter count and a per-device memory estimate (world size nproc x NNODES), and exits.
With `--nproc`, a run directory another live run holds is refused before anything starts, and
train.max_restarts is handed to torchrun (restarts resume from the latest checkpoint).
"""

from __future__ import annotations

import os


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
    from mugv.parallel.launch import Rendezvous, SignalRelay, launch_env, single_process_env

    if args.dry_run:
        from mugv.training.plan import describe

        world = args.nproc * int(os.environ.get("NNODES", "1")) or int(os.environ.get("WORLD_SIZE", "0"))
        print(describe(cfg, world_size=world or None))
        return 0
    check_data_paths(cfg, args.config)
    rendezvous = Rendezvous.from_env(os.environ)
    if args.nproc and "WORLD_SIZE" not in os.environ:
        from mugv.utils.runlock import check_free

        env = launch_env(os.environ, args.nproc)
        rdzv_id = os.environ.get("RDZV_ID", "mugv")
        if rendezvous.endpoint:  # what every node's launcher of this job shares (the run lock's job id)
            env.setdefault("MUGV_JOB_ID", f"{rendezvous.endpoint}/{rdzv_id}")
        check_free(cfg.run_dir, env.get("MUGV_JOB_ID", ""))  # refuse before any process starts
        cmd = rendezvous.command(args.nproc, ["train", args.config, *args.overrides], rdzv_id=rdzv_id,
                                 max_restarts=cfg.train.max_restarts, orphan_grace_s=cfg.watchdog.orphan_grace_s)
        return SignalRelay().run(cmd, env)
    from mugv.training.trainer import train

    if "WORLD_SIZE" in os.environ:  # under torchrun
        return train(cfg)
    with single_process_env():  # a plain single-process run: be our own rendezvous
        return train(cfg)


def check_data_paths(cfg, config: str) -> None:
    """Every data.paths entry exists here, and is a pairs dataset exactly when the objective is
    Flow-DPO (and then not packed), before any process starts."""
    from mugv.config import ConfigError
    from mugv.data.store import read_meta

    missing = [p for p in cfg.data.paths if not os.path.exists(p)]
    if missing:
        raise ConfigError(f"{config}: data.paths: {missing[0]} does not exist")
    dpo = cfg.train.objective == "flow_dpo"
    for path in cfg.data.paths:
        pairs = os.path.isdir(path) and bool(read_meta(path).get("pairs"))
        if pairs != dpo:
            raise ConfigError(f"{config}: data.paths: {path} " + (
                "is a preference-pairs dataset: it needs train.objective=flow_dpo" if pairs else
                "is not a preference-pairs dataset (mugv prep --pairs), which train.objective=flow_dpo needs"))
        if pairs and cfg.data.packing:
            raise ConfigError(f"{config}: data.packing: {path} is a preference-pairs dataset, batched by bucket "
                              "whole pairs at a time: set data.packing=false")
