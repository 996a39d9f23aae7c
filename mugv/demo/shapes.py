"""Synthetic demo media: coloured shapes moving in a straight line over a plain background.

Every clip is described by a `ShapeClip` (shape, colour, background, direction, size, offset)
drawn from a seeded generator, rendered with a one-pixel soft edge, and captioned from its
description ("a red circle moving right on a black background"). `write_demo_media`
writes mp4 clips, PNG images (first frames of further clips) and the CSV captions file that
`mugv prep` reads.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass

import numpy as np

from mugv.utils.video import write_image, write_video

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 230),
    "yellow": (235, 215, 40),
}
BACKGROUNDS = {"black": (0, 0, 0)}
SHAPES = ("circle", "square")
JITTER_R, JITTER_O = (0.19, 0.22), (0.45, 0.55)
# direction -> unit motion (dx, dy) in image coordinates (y down)
# one distinct word per direction: a tiny random text encoder tells words apart far more easily
# than word order ("left to right" vs "right to left")
DIRECTIONS = {
    "right": (1, 0),
    "left": (-1, 0),
    "down": (0, 1),
    "up": (0, -1),
}


@dataclass(frozen=True)
class ShapeClip:
    shape: str
    colour: str
    background: str
    direction: str
    radius: float  # pixels (half the side for squares)
    offset: float  # position across the motion axis, in [0, 1] of the free range

    def caption(self, video: bool = True) -> str:
        motion = f" moving {self.direction}" if video else ""
        return f"a {self.colour} {self.shape}{motion} on a {self.background} background"


def random_clips(
    count: int,
    seed: int,
    radius: tuple[float, float] = (0.11, 0.17),
    offset: tuple[float, float] = (0.2, 0.8),
) -> list[ShapeClip]:
    """`count` clip descriptions, the same for the same seed; radius (fraction of the frame) and
    offset (across the motion) are uniform in the given ranges."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        out.append(
            ShapeClip(
                shape=SHAPES[rng.integers(len(SHAPES))],
                colour=list(COLOURS)[rng.integers(len(COLOURS))],
                background=list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))],
                direction=list(DIRECTIONS)[rng.integers(len(DIRECTIONS))],
                radius=float(rng.uniform(*radius)),
                offset=float(rng.uniform(*offset)),
            )
        )
    return out


def render(clip: ShapeClip, frames: int, size: int) -> np.ndarray:
    """uint8 [frames, size, size, 3]. The shape enters touching one edge and leaves touching the
    opposite one, at constant speed."""
    r = clip.radius * size
    dx, dy = DIRECTIONS[clip.direction]
    along = np.linspace(r, size - r, frames) if frames > 1 else np.array([r])  # [F]
    across = r + clip.offset * (size - 2 * r)
    # centre coordinates per frame: moving axis runs start -> end in the motion's sign
    travel = along if dx + dy > 0 else size - along
    cx = travel if dx else np.full(frames, across)
    cy = travel if dy else np.full(frames, across)
    pix = np.arange(size) + 0.5
    px = pix[None, None, :] - cx[:, None, None]  # [F, 1, W]
    py = pix[None, :, None] - cy[:, None, None]  # [F, H, 1]
    if clip.shape == "circle":
        dist = np.sqrt(px**2 + py**2) - r  # [F, H, W] signed distance to the edge
    else:
        dist = np.maximum(np.abs(px), np.abs(py)) - r
    alpha = np.clip(0.5 - dist, 0.0, 1.0)[..., None]  # [F, H, W, 1]
    fg = np.array(COLOURS[clip.colour], dtype=np.float64)
    bg = np.array(BACKGROUNDS[clip.background], dtype=np.float64)
    video = alpha * fg + (1 - alpha) * bg
    return np.round(video).astype(np.uint8)


@dataclass
class DemoMedia:
    captions: str  # CSV (path, caption) of the clips and the images
    videos: list[str]
    images: list[str]


def write_demo_media(
    out_dir: str,
    num_videos: int = 64,
    num_images: int = 128,
    frames: int = 17,
    size: int = 64,
    fps: float = 8.0,
    seed: int = 0,
) -> DemoMedia:
    """Write videos/NNNN.mp4, images/NNNN.png and captions.csv (columns path, caption; paths
    relative to out_dir). Images are the first frames of clips drawn after the videos'."""
    if frames < 9 or (frames - 1) % 8:
        raise ValueError(f"frames = {frames}: demo clips need 8k+1 frames with k >= 1 (9, 17, ...)")
    if size < 16 or size % 16:
        raise ValueError(f"size = {size}: must be a positive multiple of 16 pixels")
    specs = random_clips(num_videos + num_images, seed, JITTER_R, JITTER_O)
    media = DemoMedia(os.path.join(out_dir, "captions.csv"), [], [])
    for sub in ("videos", "images"):
        os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
    rows = []
    for i, spec in enumerate(specs[:num_videos]):
        rel = f"videos/{i:04d}.mp4"
        write_video(os.path.join(out_dir, rel), render(spec, frames, size), fps=fps)
        rows.append((rel, spec.caption(video=True)))
        media.videos.append(os.path.join(out_dir, rel))
    for i, spec in enumerate(specs[num_videos:]):
        rel = f"images/{i:04d}.png"
        write_image(os.path.join(out_dir, rel), render(spec, 1, size)[0])
        rows.append((rel, spec.caption(video=False)))
        media.images.append(os.path.join(out_dir, rel))
    with open(media.captions, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "caption"])
        writer.writerows(rows)
    return media
