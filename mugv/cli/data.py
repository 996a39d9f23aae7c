"""`mugv data check|stats <dataset>`: validate a latent dataset, or show its buckets and batch sizes."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("data", help="inspect and validate latent datasets")
    cmds = p.add_subparsers(dest="data_command", metavar="<action>")
    cmds.required = True
    c = cmds.add_parser("check", help="validate manifest rows against the files; exit 1 on problems")
    c.add_argument("dataset", help="mugv dataset directory or release training CSV")
    c.add_argument(
        "--values", type=int, default=-1,
        help="check the tensors of only this many rows, a random sample (default: every row)",
    )
    c.add_argument("--seed", type=int, default=0)
    c.set_defaults(func=run_check)
    s = cmds.add_parser("stats", help="buckets, micro-batch sizes and batches per epoch under a data config")
    s.add_argument("dataset", nargs="+", help="dataset directories / release CSVs")
    s.add_argument("--config", default=None, help="YAML file of a DataConfig")
    s.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="DataConfig override, e.g. --set token_budget=100000 (repeatable)",
    )
    s.set_defaults(func=run_stats)


def run_check(args) -> int:
    from mugv.data.check import check_dataset

    report = check_dataset(args.dataset, value_samples=args.values, seed=args.seed)
    print(report.format())
    return 0 if report.ok else 1


def run_stats(args) -> int:
    from mugv.config.loader import load_config
    from mugv.data.buckets import num_tokens
    from mugv.data.config import DataConfig
    from mugv.data.loader import load_all_records
    from mugv.data.sampler import BucketBatchSampler

    cfg = load_config(DataConfig, args.config, args.overrides)
    cfg.paths = list(args.dataset)
    records, errors = load_all_records(cfg)
    sampler = BucketBatchSampler([r.bucket for r in records], [r.task for r in records], cfg)
    print(
        f"{len(records)} samples ({len(errors)} unreadable rows), {sampler.epoch_batches} micro-batches per epoch"
    )
    for b, target in zip(sampler.buckets, sampler.targets, strict=True):
        t, h, w = (int(v) for v in b.name.split("x"))
        print(
            f"  {b.name:>12s} {8 * h}x{8 * w} px  tokens {num_tokens(t, h, w):>7d}  samples {len(b.indices):>7d}  "
            f"per epoch {target:>7d}  micro-batch {b.batch_size}"
        )
    return 0
