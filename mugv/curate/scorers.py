"""Per-clip scores, computed with OpenCV on the clip's decoded RGB frames.

Each clip has L frames (prep's selection at the target fps). Two resized copies are used,
both made with cv2.resize(..., INTER_AREA) to a short side of:
  reference_short_side -- the K key frames (evenly spaced, first and last included);
  flow_short_side      -- all L frames, as grey (cv2.COLOR_RGB2GRAY).

  sharpness        mean over key frames of the variance of cv2.Laplacian(grey, CV_64F)
  motion           mean over `motion_pairs` evenly spaced consecutive pairs (k, k+1) of the mean
                   Farneback flow magnitude (pyr_scale 0.5, levels 3, winsize 15, iterations 3,
                   poly_n 5, poly_sigma 1.2) on the small grey frames, times
                   reference_short_side / flow_short_side: pixels per frame at the reference size
  brightness       mean of the small grey frames' means
  black_fraction   share of small grey frames whose mean is below black_luma
  frozen_fraction  share of consecutive small grey pairs whose mean |difference| is below frozen_diff
  border_fraction  1 - (content box area / frame area); the box drops edge rows / columns whose
                   mean, on the per-pixel maximum of the key frames' grey, is below border_luma
  phash            imagehash.phash of each key frame (64 bits, hex), for near-duplicates
"""

from __future__ import annotations

import numpy as np

from mugv.curate.config import AnalysisConfig

FARNEBACK = dict(pyr_scale=0.5, levels=3, winsize=15, iterations=3, poly_n=5, poly_sigma=1.2, flags=0)


def even_positions(n: int, k: int) -> list[int]:
    """k evenly spaced positions in range(n), first and last included (all of them if k >= n)."""
    if k >= n:
        return list(range(n))
    if k == 1:
        return [(n - 1) // 2]
    return [round(i * (n - 1) / (k - 1)) for i in range(k)]


def resize(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    import cv2

    return cv2.resize(rgb, (size[1], size[0]), interpolation=cv2.INTER_AREA)


def grey(rgb: np.ndarray) -> np.ndarray:
    import cv2

    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)


def laplacian_variance(grey_frame: np.ndarray) -> float:
    import cv2

    return float(cv2.Laplacian(grey_frame, cv2.CV_64F).var())


def flow_magnitude(a: np.ndarray, b: np.ndarray) -> float:
    """Mean Farneback flow magnitude from grey frame a to b, in pixels."""
    import cv2

    flow = cv2.calcOpticalFlowFarneback(a, b, None, **FARNEBACK)  # [H, W, 2]
    return float(np.sqrt(flow[..., 0] ** 2 + flow[..., 1] ** 2).mean())


def border_fraction(greys: list[np.ndarray], luma: float) -> float:
    peak = np.max(np.stack(greys), axis=0).astype(np.float64)  # [H, W]
    h, w = peak.shape

    def edge(dark: np.ndarray) -> tuple[int, int]:
        if dark.all():
            return len(dark), 0
        lead = int(np.argmin(dark))
        trail = int(np.argmin(dark[::-1]))
        return lead, trail

    top, bottom = edge(peak.mean(axis=1) < luma)
    left, right = edge(peak.mean(axis=0) < luma)
    content = max(0, h - top - bottom) * max(0, w - left - right)
    return 1.0 - content / (h * w)


def phash(rgb: np.ndarray) -> str:
    import imagehash
    from PIL import Image

    return str(imagehash.phash(Image.fromarray(rgb)))


def hamming(a: str, b: str) -> int:
    return (int(a, 16) ^ int(b, 16)).bit_count()


def score_clip(key_rgb: list[np.ndarray], small_grey: list[np.ndarray], cfg: AnalysisConfig) -> dict:
    """key_rgb: K reference-size RGB key frames; small_grey: the clip's L flow-size grey frames."""
    import cv2

    key_grey = [grey(f) for f in key_rgb]
    means = np.array([g.mean() for g in small_grey])
    diffs = np.array([cv2.absdiff(a, b).mean() for a, b in zip(small_grey[:-1], small_grey[1:])])
    pairs = even_positions(len(small_grey) - 1, cfg.motion_pairs or len(small_grey))
    flows = [flow_magnitude(small_grey[k], small_grey[k + 1]) for k in pairs]
    return {
        "sharpness": float(np.mean([laplacian_variance(g) for g in key_grey])),
        "motion": float(np.mean(flows)) * cfg.reference_short_side / cfg.flow_short_side if flows else 0.0,
        "brightness": float(means.mean()),
        "black_fraction": float((means < cfg.black_luma).mean()),
        "frozen_fraction": float((diffs < cfg.frozen_diff).mean()) if len(diffs) else 0.0,
        "border_fraction": border_fraction(key_grey, cfg.border_luma),
        "phash": ",".join(phash(f) for f in key_rgb),
    }
