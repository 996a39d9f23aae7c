"""Loss curves of the demo's stages: read from TensorBoard, written as CSV and a matplotlib PNG."""

from __future__ import annotations

import csv
import glob
import os

import numpy as np

from mugv.utils.logging import get_logger

log = get_logger("demo")
TAG = "loss/all"
Curve = tuple[str, list[tuple[int, float]]]  # (stage name, [(step, loss)])


def read_loss_curves(run_dirs: list[str], tag: str = TAG) -> list[Curve]:
    """[(stage, [(step, loss)])] from each run dir's tb/ events; a stage without events
    (TensorBoard not installed) gets an empty list."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        log.warning("tensorboard is not installed: no loss curve")
        return [(os.path.basename(d), []) for d in run_dirs]
    curves = []
    for d in run_dirs:
        points: dict[int, float] = {}
        for events in sorted(glob.glob(os.path.join(d, "tb", "events.out.tfevents.*"))):
            acc = EventAccumulator(events, size_guidance={"scalars": 0})
            acc.Reload()
            if tag in acc.Tags().get("scalars", []):
                points.update({e.step: e.value for e in acc.Scalars(tag)})  # a resumed run rewrites steps
        curves.append((os.path.basename(os.path.normpath(d)), sorted(points.items())))
    return curves


def write_loss_csv(path: str, curves: list[Curve]) -> str:
    """Rows stage, step (within the stage), global_step (stages back to back), loss."""
    offset = 0
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["stage", "step", "global_step", "loss"])
        for name, points in curves:
            for step, loss in points:
                w.writerow([name, step, offset + step, f"{loss:.6f}"])
            offset += points[-1][0] if points else 0
    return path


def _global(curves: list[Curve]) -> list[tuple[str, np.ndarray, np.ndarray]]:
    out, offset = [], 0
    for name, points in curves:
        if points:
            steps, losses = np.array(points, dtype=np.float64).T
            out.append((name, steps + offset, losses))
            offset += int(steps[-1])
    return out


def write_loss_png(path: str, curves: list[Curve]) -> str | None:
    """The stages' loss curves back to back, with axes, labels, a legend and the stage starts
    marked; None when there is nothing to plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = _global(curves)
    if not series:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, x, y in series:
        ax.plot(x, y, label=f"{name} (steps {int(x[0])}-{int(x[-1])})")
        ax.axvline(x[0], color="0.8", lw=0.8, ls="--")
    ax.set_xlabel("training step (stages back to back)")
    ax.set_ylabel("flow-matching loss (per logged step)")
    ax.set_title("mugv demo: training loss")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
