"""Did the demo model learn? Score sampled clips against their captions.

For a clip sampled from "a <colour> <shape> moving <direction> on a black background":
  colour     the mean colour of the foreground pixels (those clearly brighter than the black
             background) over the whole clip is nearest, among the demo's palette, to <colour>;
  direction  the foreground's centroid (intensity-weighted) moves along the captioned axis, in the
             captioned sense, by at least `min_travel` of the frame, and further along that axis
             than across it. The motion is the least-squares slope of the centroid over frames.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mugv.demo.shapes import COLOURS, DIRECTIONS, SHAPES, ShapeClip

FOREGROUND = 60  # a pixel is foreground when its brightest channel exceeds this (background 0)


@dataclass(frozen=True)
class ClipScore:
    prompt: str
    colour: str  # captioned
    direction: str
    seen_colour: str | None  # nearest palette colour of the foreground (None: no foreground)
    motion: tuple[float, float]  # centroid travel (dx, dy) over the clip, in frame widths
    colour_ok: bool
    direction_ok: bool


def score_prompts() -> list[ShapeClip]:
    """The 8 clips to caption and sample: each colour moving one horizontal and one vertical way,
    each direction twice, shapes alternating."""
    names = list(DIRECTIONS)  # right, left, down, up
    return [
        ShapeClip(SHAPES[(i + j) % len(SHAPES)], colour, "black", names[(i + 2 * j) % len(names)], 0.2, 0.5)
        for i, colour in enumerate(COLOURS)
        for j in range(2)
    ]


def score_clip(video: np.ndarray, spec: ShapeClip, min_travel: float = 0.15) -> ClipScore:
    """video uint8 [F, H, W, 3] sampled for spec's caption."""
    frames, h, w, _ = video.shape
    v = video.astype(np.float64)
    fg = v.max(-1) > FOREGROUND  # [F, H, W]
    seen = None
    if fg.any():
        mean = v[fg].mean(0)  # [3]
        seen = min(COLOURS, key=lambda c: float(((np.array(COLOURS[c]) - mean) ** 2).sum()))
    weight = np.where(fg, v.max(-1), 0.0)  # [F, H, W]
    mass = weight.sum((1, 2))  # [F]
    ok = mass > 0
    motion = (0.0, 0.0)
    if ok.sum() >= 2:
        ys, xs = np.indices((h, w)) + 0.5
        cx = (weight * xs).sum((1, 2))[ok] / mass[ok] / w  # [F'] in frame widths
        cy = (weight * ys).sum((1, 2))[ok] / mass[ok] / h
        t = np.arange(frames)[ok]
        span = frames - 1
        motion = (float(np.polyfit(t, cx, 1)[0] * span), float(np.polyfit(t, cy, 1)[0] * span))
    dx, dy = DIRECTIONS[spec.direction]
    along = motion[0] * dx + motion[1] * dy
    across = abs(motion[0] * dy) + abs(motion[1] * dx)
    return ClipScore(
        prompt=spec.caption(video=True),
        colour=spec.colour,
        direction=spec.direction,
        seen_colour=seen,
        motion=motion,
        colour_ok=seen == spec.colour,
        direction_ok=along >= min_travel and along > across,
    )


def format_scores(scores: list[ClipScore]) -> str:
    lines = [
        f"  {'ok' if s.colour_ok and s.direction_ok else '--'}  {s.prompt:58s} colour {s.seen_colour or '-':6s} "
        f"travel dx {s.motion[0]:+.2f} dy {s.motion[1]:+.2f}"
        for s in scores
    ]
    n = len(scores)
    lines.append(
        f"sample score: colour {sum(s.colour_ok for s in scores)}/{n}, "
        f"direction {sum(s.direction_ok for s in scores)}/{n}"
    )
    return "\n".join(lines)
