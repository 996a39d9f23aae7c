"""Tiny built-in STAND-INS for the model-based scorers and captioner -- not trained models.

They let the plug-in path (model directory -> loader -> per-clip call, mugv.curate.models) run
in tests and demos with nothing to download. Each is a fixed, documented formula on the key
frames (uint8 [K, H, W, 3] RGB), its constants kept in the directory's curate_model.json the way
a real model keeps weights there. Replace them with real models for real curation.

  aesthetic  clip(bias + w_colour * colourfulness + w_contrast * contrast, 0, 10): colourfulness
             is Hasler & Suesstrunk's (2003) metric over all key-frame pixels, contrast the
             standard deviation of their grey levels (cv2.COLOR_RGB2GRAY)
  artifact   share of pixels with a channel <= low or >= high (clipped exposure)
  caption    "a {dark|mid-toned|bright} clip, mostly {colour}": mean grey level, and the most
             common hue among saturated pixels (S > 40), or "grey" if under 10% are saturated
"""

from __future__ import annotations

import json
import os

import numpy as np

DEFAULTS = {
    "aesthetic": {"bias": 2.5, "w_colour": 0.04, "w_contrast": 0.03},
    "artifact": {"low": 2, "high": 253},
    "caption": {},
}
# OpenCV hue (0-179) upper bounds of colour names
HUES = [
    (10, "red"),
    (22, "orange"),
    (35, "yellow"),
    (85, "green"),
    (100, "cyan"),
    (130, "blue"),
    (170, "purple"),
    (180, "red"),
]


def write_standin(directory: str, kind: str) -> str:
    """Create a model directory for the stand-in of `kind`; returns the directory."""
    if kind not in DEFAULTS:
        raise ValueError(f"stand-in kind {kind!r}, expected one of {sorted(DEFAULTS)}")
    os.makedirs(directory, exist_ok=True)
    spec = {"loader": "mugv.curate.standin:load", "kind": kind, "stand_in": True, **DEFAULTS[kind]}
    with open(os.path.join(directory, "curate_model.json"), "w") as f:
        json.dump(spec, f, indent=1)
    return directory


def colourfulness(rgb: np.ndarray) -> float:
    r, g, b = (rgb[..., c].astype(np.float64) for c in range(3))
    rg, yb = r - g, 0.5 * (r + g) - b
    return float(np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean()))


def _greys(frames: np.ndarray) -> np.ndarray:
    import cv2

    return np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames])


def aesthetic(frames: np.ndarray, bias: float, w_colour: float, w_contrast: float) -> float:
    score = (
        bias + w_colour * colourfulness(frames) + w_contrast * float(_greys(frames).astype(np.float64).std())
    )
    return float(np.clip(score, 0.0, 10.0))


def artifact(frames: np.ndarray, low: int, high: int) -> float:
    return float(((frames <= low) | (frames >= high)).any(axis=-1).mean())


def caption(frames: np.ndarray) -> str:
    import cv2

    luma = float(_greys(frames).mean())
    tone = "dark" if luma < 70 else "bright" if luma > 170 else "mid-toned"
    hsv = np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2HSV) for f in frames])
    hue = hsv[..., 0][hsv[..., 1] > 40]
    if hue.size < 0.1 * hsv[..., 0].size:
        return f"a {tone} clip, mostly grey"
    counts = np.bincount(hue.ravel(), minlength=180)
    top = int(np.argmax(counts))
    return f"a {tone} clip, mostly {next(name for bound, name in HUES if top < bound)}"


def load(model_dir: str, spec: dict):
    kind = spec.get("kind")
    if kind not in DEFAULTS:
        raise ValueError(
            f"{model_dir}/curate_model.json: stand-in kind {kind!r}, expected one of {sorted(DEFAULTS)}"
        )
    params = {k: spec.get(k, v) for k, v in DEFAULTS[kind].items()}
    fn = {"aesthetic": aesthetic, "artifact": artifact, "caption": caption}[kind]
    return lambda frames: fn(frames, **params)
