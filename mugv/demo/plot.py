"""Loss curves of the demo's stages: read from TensorBoard, written as CSV and PNG.

The PNG is drawn with matplotlib when it is installed; otherwise a plain plot (axes, one
polyline per stage, a grey line at each stage boundary, no text) is rasterised with numpy so
the demo always leaves a picture next to the CSV.
"""

from __future__ import annotations

import csv
import glob
import os

import numpy as np

from mugv.utils.logging import get_logger

log = get_logger("demo")
TAG = "loss/all"
Curve = tuple[str, list[tuple[int, float]]]  # (stage name, [(step, loss)])
STAGE_COLOURS = ((31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189))


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
    series = _global(curves)
    if not series:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from mugv.utils.video import write_image

        write_image(path, render_plot(series))
        return path
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, x, y in series:
        ax.plot(x, y, label=name)
        ax.axvline(x[0], color="0.8", lw=0.8)
    ax.set_xlabel("step (stages back to back)")
    ax.set_ylabel("flow-matching loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def render_plot(series: list[tuple[str, np.ndarray, np.ndarray]], height: int = 300, width: int = 480):
    """uint8 [height, width, 3]: the curves on white, axes in black, stage starts in grey."""
    img = np.full((height, width, 3), 255, dtype=np.uint8)
    m = 20  # margin
    xs = np.concatenate([x for _, x, _ in series])
    ys = np.concatenate([y for _, _, y in series])
    x0, x1 = 0.0, max(float(xs.max()), 1.0)
    y0, y1 = 0.0, max(float(ys.max()) * 1.05, 1e-6)

    def to_px(x, y):
        col = m + (np.asarray(x) - x0) / (x1 - x0) * (width - 2 * m)
        row = height - m - (np.asarray(y) - y0) / (y1 - y0) * (height - 2 * m)
        return row, col

    img[m : height - m + 1, m] = 0  # y axis
    img[height - m, m : width - m + 1] = 0  # x axis
    for k, (_, x, y) in enumerate(series):
        _, c = to_px(x[0], 0)
        img[m : height - m, int(round(float(c)))] = 190
        # dense points along the polyline, 2 px thick
        t = np.linspace(0, len(x) - 1, max(2, 8 * width))
        row, col = to_px(np.interp(t, np.arange(len(x)), x), np.interp(t, np.arange(len(y)), y))
        for dr in (0, 1):
            for dc in (0, 1):
                r = np.clip(np.round(row).astype(int) + dr, 0, height - 1)
                cc = np.clip(np.round(col).astype(int) + dc, 0, width - 1)
                img[r, cc] = STAGE_COLOURS[k % len(STAGE_COLOURS)]
    return img
