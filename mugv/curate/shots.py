"""Shot splitting and clip planning.

Shots: PySceneDetect's ContentDetector runs on downscaled frames; each cut it reports is then
kept only if the hue-saturation histograms of the frames either side of it differ (the colour-
structure check), which rejects flashes and fast motion, and if it comes at least
`min_shot_frames` after the previous kept cut. A cut at frame c starts a new shot at c; shots
are [start, end) in source frames (the last one may be shorter than min_shot_frames).

Clips: each shot (less `margin_frames` at both ends) is cut into consecutive clips of the
bucket-table lengths (8k+1 frames at the target fps, the longest that fits first), with the
frame selection of `mugv prep`: clip [start, end) has end = start + ceil((L - 1) * step) + 1
source frames (step = source fps / clip fps), which prep resamples to exactly L frames.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from mugv.curate.config import ClipConfig, ShotConfig
from mugv.curate.decode import VideoInfo, frames
from mugv.data.buckets import BucketTable
from mugv.data.prep.media import MediaError, resampled_indices


@dataclass(frozen=True)
class ClipPlan:
    shot: int
    start: int  # source frames [start, end)
    end: int
    indices: tuple[int, ...]  # the L source frames of the clip (prep's selection)
    fps: float


def scaled_size(height: int, width: int, short_side: int) -> tuple[int, int]:
    """(h, w) with the shorter side `short_side` and the aspect ratio kept (rounded)."""
    s = short_side / min(height, width)
    return max(1, round(height * s)), max(1, round(width * s))


def hs_histogram(bgr: np.ndarray) -> np.ndarray:
    """Normalised 16 x 16 hue-saturation histogram of a BGR uint8 frame."""
    import cv2

    hsv = cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV)
    hist = cv2.calcHist([hsv], [0, 1], None, [16, 16], [0, 180, 0, 256])
    return cv2.normalize(hist, hist, 1.0, 0.0, cv2.NORM_L1)


def detect_shots(path: str, info: VideoInfo, cfg: ShotConfig) -> tuple[list[tuple[int, int]], int]:
    """-> (shots [(start, end)], number of decoded frames). One decoding pass."""
    import cv2
    from scenedetect import ContentDetector, FrameTimecode

    # every candidate cut first; the minimum shot length is applied after the colour check, so a
    # rejected false cut cannot hide a real one right after it
    detector = ContentDetector(threshold=cfg.threshold, min_scene_len=1)
    h, w = scaled_size(info.height, info.width, min(cfg.detect_short_side, info.height, info.width))
    cuts: list[int] = []
    dist: list[float] = [0.0]  # dist[j]: histogram distance between frames j - 1 and j
    prev = None
    n = 0
    for n, frame in enumerate(frames(path), 1):  # noqa: B007 - n counts the frames
        bgr = frame.reformat(width=w, height=h, format="bgr24").to_ndarray()
        tc = FrameTimecode(n - 1, info.fps)
        cuts += [c.frame_num for c in detector.process_frame(tc, bgr)]
        hist = hs_histogram(bgr)
        if prev is not None:
            dist.append(float(cv2.compareHist(prev, hist, cv2.HISTCMP_BHATTACHARYYA)))
        prev = hist
    if n == 0:
        raise MediaError("unreadable", f"{path}: no frames decoded")
    cuts += [c.frame_num for c in detector.post_process(FrameTimecode(n - 1, info.fps))]
    bounds = [0]
    for c in sorted({c for c in cuts if 0 < c < n and dist[c] >= cfg.min_hist_distance}):
        if c - bounds[-1] >= cfg.min_shot_frames:
            bounds.append(c)
    bounds.append(n)
    return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a], n


def plan_clips(shots: list[tuple[int, int]], src_fps: float, cfg: ClipConfig, margin: int) -> list[ClipPlan]:
    """Consecutive clips of every shot (see the module docstring)."""
    table = BucketTable.from_config(cfg.buckets)
    plans = []
    for s, (a, b) in enumerate(shots):
        start, end = a + margin, b - margin
        made = 0
        while end - start > 0 and (cfg.max_clips_per_shot == 0 or made < cfg.max_clips_per_shot):
            avail, fps = resampled_indices(end - start, src_fps, cfg.fps)
            length = table.longest_fitting(len(avail), video=True)
            if length is None:
                break
            stop = start + math.ceil((length - 1) * src_fps / fps - 1e-9) + 1
            idx, _ = resampled_indices(stop - start, src_fps, cfg.fps)
            if stop > end or len(idx) != length:  # float edge cases: prep would read other frames
                break
            plans.append(ClipPlan(s, start, stop, tuple(start + i for i in idx), fps))
            start, made = stop, made + 1
    return plans
