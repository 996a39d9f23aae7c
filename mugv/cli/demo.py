"""`mugv demo [--out runs/demo] [--nproc 2] [--fast] [--overwrite]`: the built-in CPU demo.

Synthetic moving-shape clips -> PCA autoencoder + tiny T5 -> `mugv prep`-path dataset -> the
demo curriculum (images at TP=2, then video at PP=2) -> HF export -> 8 sampled clips, scored for
colour and direction against their captions, and the loss curve as CSV/PNG (mugv.demo.pipeline).
About 8 minutes on 2 CPU cores (`--fast`: about a minute, a smoke test).
"""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("demo", help="run the end-to-end CPU demo (data, 2-stage training, export, sample)")
    p.add_argument("--out", default="runs/demo", help="output directory (must be empty or absent)")
    p.add_argument("--nproc", type=int, default=2, choices=(1, 2), help="processes per training stage")
    p.add_argument(
        "--fast", action="store_true", help="a few steps only: checks the pipeline, learns nothing"
    )
    p.add_argument("--overwrite", action="store_true", help="delete --out first if it exists")
    p.set_defaults(func=run)


def run(args) -> int:
    from mugv.demo.pipeline import DemoPlan, run_demo

    plan = DemoPlan.fast() if args.fast else DemoPlan()
    result = run_demo(args.out, nproc=args.nproc, plan=plan, overwrite=args.overwrite)
    print(result.format())
    return 0
