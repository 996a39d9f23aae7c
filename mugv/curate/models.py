"""Model-based scorers and captioners: one plug-in interface, local model directories only.

A model directory holds `curate_model.json`:

    {"loader": "package.module:function", ...settings of that loader...}

`function(model_dir: str, spec: dict) -> model` is imported and called once per process (the
spec is the JSON object). The model is a callable on a clip's key frames, uint8 [K, H, W, 3]
RGB at the reference size, returning

    kind "aesthetic": a score on the 0-10 scale of the report's aesthetic predictor (kept >= 4.5)
    kind "artifact":  the probability that the clip shows generation / compression artefacts
    kind "caption":   the clip's caption (str)

Nothing is downloaded: a loader reads its weights from model_dir (e.g. transformers'
`from_pretrained(model_dir, local_files_only=True)`). mugv ships tiny stand-ins
(mugv.curate.standin) that serve the tests through this same path.
"""

from __future__ import annotations

import importlib
import json
import math
import os

import numpy as np

from mugv.config.loader import ConfigError
from mugv.curate.config import ModelConfig

_LOADED: dict[tuple[str, str], object] = {}  # per-process cache: (kind, directory) -> model


def read_spec(path: str) -> dict:
    file = os.path.join(path, "curate_model.json")
    with open(file) as f:
        try:
            spec = json.load(f)
        except json.JSONDecodeError as err:
            raise ConfigError(f"{file}: not valid JSON ({err})") from None
    if not isinstance(spec, dict) or ":" not in str(spec.get("loader", "")):
        raise ConfigError(f'{file}: needs "loader": "package.module:function"')
    return spec


def load_model(m: ModelConfig):
    key = (m.kind, os.path.abspath(m.path))
    if key not in _LOADED:
        spec = read_spec(m.path)
        module, _, name = spec["loader"].partition(":")
        try:
            loader = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as err:
            raise ConfigError(f"{m.path}/curate_model.json: loader {spec['loader']!r}: {err}") from None
        _LOADED[key] = loader(m.path, spec)
    return _LOADED[key]


def run_models(models: list[ModelConfig], key_frames: np.ndarray) -> dict:
    """-> {"aesthetic": float | None, "artifact": float | None, "model_caption": str | None}."""
    out: dict = {"aesthetic": None, "artifact": None, "model_caption": None}
    for m in models:
        value = load_model(m)(key_frames)
        if m.kind == "caption":
            if not isinstance(value, str):
                raise TypeError(f"caption model {m.path} returned {type(value).__name__}, expected str")
            out["model_caption"] = value
        else:
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(f"{m.kind} model {m.path} returned {value}")
            out[m.kind] = value
    return out
