"""`mugv curriculum FILE [--root DIR] [--dry-run] [key=value ...]`: run the stages of a curriculum
in order (see mugv.training.curriculum for the file format), one torchrun per stage, skipping
finished stages and resuming the one in progress. Overrides apply to every stage. `--dry-run`
prints each stage's status, command, layout and memory estimate, and starts nothing.

Exit codes: 0 all stages complete, 1 a stage failed, 3 a stage stopped early (pre-emption signal
or time budget; run the same command again to continue), 2 a config error.
"""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("curriculum", help="run the training stages of a curriculum YAML in order")
    p.add_argument("file", help="curriculum YAML (see configs/curriculum/)")
    p.add_argument("overrides", nargs="*", help="dotlist overrides for every stage, e.g. data.num_workers=4")
    p.add_argument("--root", default=None, help="directory of the stage run dirs (default: the file's root)")
    p.add_argument(
        "--dry-run", action="store_true", help="print stages, commands and memory estimates; no training"
    )
    p.set_defaults(func=run)


def run(args) -> int:
    from mugv.training.curriculum import run_curriculum

    results = run_curriculum(args.file, args.root, args.overrides, dry_run=args.dry_run)
    if args.dry_run:
        print("\n\n".join(r.plan for r in results))
        return 0
    for r in results:
        print(f"{r.name:24s} {r.status:12s} step {r.step}/{r.steps}  {r.run_dir}")
    last = results[-1].status
    return {"failed": 1, "interrupted": 3}.get(last, 0)
