"""`mugv curate`: source videos -> shots -> scored, filtered clips -> a clips CSV for `mugv prep`.

    mugv curate run --input videos/ --output cur/ [--config curate.yaml] [--engine ray] [--shard 0/4] [k=v ...]
    mugv curate summary cur/ [filters.min_motion=2 ...]     # re-filter the stored scores
    mugv curate sample cur/ --by bucket,motion --n 1000 --output stage_a.csv
    mugv curate standin models/aesthetic --kind aesthetic  # tiny stand-in model directory (tests, demos)

Rerunning `run` resumes (finished videos are skipped).
"""

from __future__ import annotations

import os


def register(sub) -> None:
    p = sub.add_parser("curate", help="split videos into shots and clips, score and filter them (resumable)")
    cmds = p.add_subparsers(dest="curate_command", metavar="<action>")
    cmds.required = True
    r = cmds.add_parser("run", help="curate a directory or CSV of videos into OUTPUT")
    r.add_argument("--config", default=None, help="YAML file of a CurateConfig")
    r.add_argument("--input", default=None, help="directory of videos, or CSV with path (+ caption)")
    r.add_argument("--output", default=None, help="output directory")
    r.add_argument("--engine", default=None, choices=["local", "ray"])
    r.add_argument("--workers", type=int, default=None, help="local engine processes (0 = one per core)")
    r.add_argument("--shard", default=None, help="I/N: curate shard I of N (videos i with i %% N == I)")
    r.add_argument("overrides", nargs="*", default=[], help="CurateConfig overrides key=value")
    r.set_defaults(func=run)
    s = cmds.add_parser("summary", help="rebuild table, CSV and histograms from stored scores")
    s.add_argument("output", help="a `mugv curate run` output directory")
    s.add_argument("overrides", nargs="*", default=[], help="filters.* overrides key=value")
    s.set_defaults(func=summary)
    m = cmds.add_parser("sample", help="stratified subset of the kept clips, as a clips CSV")
    m.add_argument("curated", help="a `mugv curate run` output directory")
    m.add_argument("--by", required=True, help="comma-separated columns, e.g. bucket,motion")
    m.add_argument("--n", type=int, required=True, help="clips to draw")
    m.add_argument("--bins", type=int, default=3, help="quantile bins of numeric columns")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--output", default=None, help="CSV to write (default CURATED/sample.csv)")
    m.set_defaults(func=sample)
    t = cmds.add_parser("standin", help="write a built-in stand-in model directory (not a trained model)")
    t.add_argument("directory")
    t.add_argument("--kind", required=True, choices=["aesthetic", "artifact", "caption"])
    t.set_defaults(func=standin)


def run(args) -> int:
    from mugv.config.loader import ConfigError, load_config
    from mugv.curate.config import CurateConfig
    from mugv.curate.pipeline import run_curation

    flags = {
        k: getattr(args, k) for k in ("input", "output", "engine", "workers") if getattr(args, k) is not None
    }
    if args.shard is not None:
        i, _, n = args.shard.partition("/")
        if not (i.isdigit() and n.isdigit()):
            raise ConfigError(f"--shard {args.shard!r} is not of the form I/N, e.g. 0/4")
        flags.update(shard=int(i), num_shards=int(n))
    cfg = load_config(CurateConfig, args.config, [*args.overrides, *(f"{k}={v}" for k, v in flags.items())])
    summary = run_curation(cfg)
    print(summary.format())
    print(
        f"clips CSV: {os.path.join(cfg.output, 'clips.csv')} (mugv prep --config {cfg.output}/prep.yaml ...)"
    )
    return 0


def summary(args) -> int:
    from mugv.curate.pipeline import summarize

    print(summarize(args.output, args.overrides).format())
    return 0


def sample(args) -> int:
    from mugv.curate.sample import read_kept, stratified_sample
    from mugv.curate.table import write_clips_csv

    rows, counts = stratified_sample(
        read_kept(args.curated), [c for c in args.by.split(",") if c], args.n, args.bins, args.seed
    )
    out = args.output or os.path.join(args.curated, "sample.csv")
    write_clips_csv(rows, out)
    for key, (size, taken) in counts.items():
        print(f"  {' '.join(key):<50} {taken:>6} of {size}")
    print(
        f"sample: {len(rows)} of {sum(s for s, _ in counts.values())} kept clips in {len(counts)} strata -> {out}"
    )
    return 0


def standin(args) -> int:
    from mugv.curate.standin import write_standin

    print(
        f"stand-in {args.kind} model (a fixed formula, not a trained model): {write_standin(args.directory, args.kind)}"
    )
    return 0
