"""`mugv data check|stats|plan`: validate a latent dataset, show its buckets and batch sizes, or
plan a stage's steps over data-parallel ranks (balance, token fill, mix) without training."""

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
    pl = cmds.add_parser("plan", help="what a stage config's sampler feeds each DP rank: balance, fill, mix")
    pl.add_argument("config", help="YAML TrainConfig (a stage, e.g. configs/stages/10b_d_video720p.yaml)")
    pl.add_argument("overrides", nargs="*", help="dotlist overrides, e.g. data.packing=false")
    pl.add_argument("--dp", type=int, required=True, help="data-parallel ranks")
    pl.add_argument("--steps", type=int, default=100, help="steps to plan")
    pl.add_argument("--synthetic", default=None, metavar="BUCKET=COUNT,...",
                    help="plan for a dataset that does not exist yet: samples per latent bucket TxHxW "
                         "(T=1: images), e.g. 14x90x160=6000,1x90x160=800; else data.paths are read")
    pl.add_argument("--json", default=None, metavar="FILE",
                    help="write the plan: [step][rank][micro-batch] -> [{id, shape: [T, H, W]}]")
    pl.set_defaults(func=run_plan)


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


def run_plan(args) -> int:
    import json

    from mugv.config import ConfigError, load_config
    from mugv.data import plan_report as pr
    from mugv.models.flops import sample_cost
    from mugv.training.config import TrainConfig

    if args.dp < 1 or args.steps < 1:
        raise ConfigError(f"--dp ({args.dp}) and --steps ({args.steps}) must be >= 1")
    cfg = load_config(TrainConfig, args.config, args.overrides)
    if args.synthetic:
        buckets, tasks, ids = pr.synthetic_records(pr.parse_synthetic(args.synthetic))
    else:
        from mugv.data.loader import load_all_records

        records, _ = load_all_records(cfg.data)
        buckets, tasks, ids = [r.bucket for r in records], [r.task for r in records], [r.id for r in records]
    cost = sample_cost(cfg.model.build(), cfg.data.text_len)
    M = cfg.train.microbatches
    sampler = pr.make_sampler(buckets, tasks, cfg.data, args.dp, M, cost)
    steps = pr.draw_steps(sampler, args.dp, M, args.steps)
    report = pr.summarize(steps, sampler, buckets, cfg.data.token_budget, cost)
    mode = "packed" if cfg.data.packing else "bucketed"
    print(f"{args.config}: {mode}, {len(ids)} samples, DP {args.dp} x {M} micro-batches of "
          f"{cfg.data.token_budget} tokens, {args.steps} steps, cost = {cfg.model.preset} training FLOPs")
    print(report.format())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(pr.plan_json(steps, ids, buckets), f)
        print(f"plan written to {args.json}")
    return 0
