"""The per-video function of `mugv curate`: one source video -> its shots and scored clips.

Two decoding passes: shots (mugv.curate.shots), then scores of the planned clips
(mugv.curate.scorers and the configured models), holding one clip's small frames at a time.
Both engines (local processes, Ray Data) call `curate_video_line`, so they write the same
result line for a video. Filtering happens later, on the stored scores (mugv.curate.table).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from mugv.curate.config import CurateConfig
from mugv.curate.decode import frames, probe
from mugv.curate.models import run_models
from mugv.curate.scorers import even_positions, grey, resize, score_clip
from mugv.curate.shots import ClipPlan, detect_shots, plan_clips, scaled_size
from mugv.data.prep.media import MediaError


@dataclass(frozen=True)
class VideoJob:
    video: str  # the video's key: its path as written in the input CSV, or relative to the input dir
    path: str  # resolved file path
    caption: str = ""  # from the input CSV, if it has a caption column


def curate_video_line(job: VideoJob, cfg: CurateConfig) -> str:
    """The video's result as one JSON line (no newline)."""
    return json.dumps(curate_video(job, cfg), sort_keys=True)


def curate_video(job: VideoJob, cfg: CurateConfig) -> dict:
    import cv2

    cv2.setNumThreads(1)  # one video per process; threads would only oversubscribe the cores
    result = {"video": job.video, "path": job.path, "caption": job.caption, "status": "ok", "detail": ""}
    result.update(fps=None, width=None, height=None, frames=None, shots=[], clips=[])
    try:
        info = probe(job.path)
        result.update(fps=info.fps, width=info.width, height=info.height)
        shots, n = detect_shots(job.path, info, cfg.shots)
        result.update(frames=n, shots=[list(s) for s in shots])
        plans = plan_clips(shots, info.fps, cfg.clips, cfg.shots.margin_frames)
        if not plans:
            raise MediaError(
                "too_short", f"no shot holds a clip of {min(cfg.clips.buckets.num_frames)}+ frames"
            )
        result["clips"] = _score_plans(job.path, info, plans, cfg)
    except MediaError as err:
        result.update(status=err.reason, detail=err.detail)
    except Exception as err:  # noqa: BLE001 - one bad video never stops the run
        result.update(status="error", detail=f"{type(err).__name__}: {err}")
    return result


def _score_plans(path: str, info, plans: list[ClipPlan], cfg: CurateConfig) -> list[dict]:
    a = cfg.analysis
    ref = scaled_size(info.height, info.width, a.reference_short_side)
    small = scaled_size(info.height, info.width, a.flow_short_side)
    where = {j: (c, k) for c, p in enumerate(plans) for k, j in enumerate(p.indices)}
    keys = [set(even_positions(len(p.indices), a.key_frames)) for p in plans]
    greys: list[list] = [[] for _ in plans]
    key_rgb: list[list] = [[] for _ in plans]
    out: list[dict | None] = [None] * len(plans)
    last = max(where)
    for j, frame in enumerate(frames(path)):
        if j in where:
            c, k = where[j]
            rgb = frame.to_ndarray(format="rgb24")
            greys[c].append(grey(resize(rgb, small)))
            if k in keys[c]:
                key_rgb[c].append(resize(rgb, ref))
            if k == len(plans[c].indices) - 1:
                out[c] = _clip_row(c, plans[c], key_rgb[c], greys[c], cfg)
                greys[c], key_rgb[c] = [], []
        if j >= last:
            break
    if any(r is None for r in out):
        raise MediaError("unreadable", f"{path}: decoding ended before frame {last}")
    return out


def _clip_row(c: int, plan: ClipPlan, key_rgb, greys, cfg: CurateConfig) -> dict:
    row = {"clip": c, "shot": plan.shot, "start": plan.start, "end": plan.end}
    row.update(num_frames=len(plan.indices), fps=plan.fps)
    row.update(score_clip(key_rgb, greys, cfg.analysis))
    row.update(run_models(cfg.models, np.stack(key_rgb)))
    return row
