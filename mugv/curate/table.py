"""The clip table: stored per-video results -> filtered, de-duplicated rows -> Parquet + CSV.

Every clip gets `keep` and `reason` (the first filter it fails, in FILTERS order, then
"duplicate"); `reasons` lists every filter it fails. A video that gave no clip is one row with
clip = -1 and its failure (unreadable, too_short, ...) as the reason. Near-duplicates are
searched among the clips that pass every filter, in (video, start) order: a clip is a duplicate
of the first earlier one whose key-frame pHashes are within `max_duplicate_distance` bits in
total (candidates come from exact matches of one of D + 1 bands of the hash bits, which any
pair within distance D shares: no all-pairs comparison).
"""

from __future__ import annotations

import csv
import math
import os

from mugv.config.loader import save_config
from mugv.curate.config import CurateConfig, FilterConfig
from mugv.curate.report import Summary, write_histograms
from mugv.curate.scorers import hamming
from mugv.curate.video import VideoJob
from mugv.data.buckets import BucketTable

# name -> (passes(row, filters), rule text)
FILTERS = {
    "resolution": (
        lambda r, f: min(r["width"], r["height"]) >= f.min_short_side,
        "short side >= {min_short_side}",
    ),
    "fps": (lambda r, f: r["fps"] >= f.min_fps, "clip fps >= {min_fps}"),
    "black": (
        lambda r, f: r["black_fraction"] <= f.max_black_fraction,
        "black frames <= {max_black_fraction}",
    ),
    "border": (
        lambda r, f: r["border_fraction"] <= f.max_border_fraction,
        "border area <= {max_border_fraction}",
    ),
    "brightness": (
        lambda r, f: f.min_brightness <= r["brightness"] <= f.max_brightness,
        "mean luma in [{min_brightness}, {max_brightness}]",
    ),
    "frozen": (
        lambda r, f: r["frozen_fraction"] <= f.max_frozen_fraction,
        "frozen pairs <= {max_frozen_fraction}",
    ),
    "sharpness": (
        lambda r, f: f.min_sharpness <= r["sharpness"] <= f.max_sharpness,
        "Laplacian var in [{min_sharpness}, {max_sharpness}]",
    ),
    "motion": (
        lambda r, f: f.min_motion <= r["motion"] <= f.max_motion,
        "flow px/frame in [{min_motion}, {max_motion}]",
    ),
    "aesthetic": (
        lambda r, f: r["aesthetic"] is None or r["aesthetic"] >= f.min_aesthetic,
        "aesthetic >= {min_aesthetic}",
    ),
    "artifact": (
        lambda r, f: r["artifact"] is None or r["artifact"] <= f.max_artifact,
        "artefact p <= {max_artifact}",
    ),
}
SCORES = [
    "sharpness",
    "motion",
    "brightness",
    "black_fraction",
    "frozen_fraction",
    "border_fraction",
    "aesthetic",
    "artifact",
]
# column -> arrow type name
COLUMNS = {
    "id": "string", "video": "string", "path": "string", "caption": "string", "shot": "int32", "clip": "int32",
    "start": "int64", "end": "int64", "start_s": "float64", "end_s": "float64", "duration_s": "float64",
    "num_frames": "int32", "fps": "float64", "src_fps": "float64", "width": "int32", "height": "int32",
    "bucket": "string", **dict.fromkeys(SCORES, "float64"), "phash": "string",
    "keep": "bool_", "reason": "string", "reasons": "string", "duplicate_of": "string", "detail": "string",
}  # fmt: skip


def clip_rows(results: list[dict], table: BucketTable) -> list[dict]:
    rows = []
    for v in sorted(results, key=lambda r: r["video"]):
        base = {k: None for k in COLUMNS}
        base.update(
            video=v["video"], path=v["path"], caption=v["caption"], width=v["width"], height=v["height"]
        )
        base.update(src_fps=v["fps"], detail=v["detail"], reasons="", duplicate_of="", keep=False)
        if v["status"] != "ok" or not v["clips"]:
            rows.append({**base, "id": v["video"], "clip": -1, "reason": v["status"], "reasons": v["status"]})
            continue
        for c in v["clips"]:
            h, w = table.nearest_size(v["height"], v["width"])
            row = {
                **base,
                **{k: c[k] for k in ("clip", "shot", "start", "end", "num_frames", "fps", "phash")},
            }
            row.update({k: c[k] for k in SCORES})
            row.update(id=f"{v['video']}[{c['start']}:{c['end']}]", bucket=f"{c['num_frames']}x{h}x{w}")
            row.update(
                start_s=c["start"] / v["fps"],
                end_s=c["end"] / v["fps"],
                duration_s=c["num_frames"] / c["fps"],
            )
            if c["model_caption"] is not None:
                row["caption"] = c["model_caption"]
            rows.append(row)
    return rows


def apply_filters(rows: list[dict], f: FilterConfig) -> None:
    for r in rows:
        if r["clip"] == -1:
            continue
        failed = [name for name, (passes, _) in FILTERS.items() if not passes(r, f)]
        r.update(keep=not failed, reason=failed[0] if failed else "", reasons=",".join(failed))
    mark_duplicates([r for r in rows if r["keep"]], f.max_duplicate_distance)


def mark_duplicates(rows: list[dict], max_distance: int) -> None:
    if max_distance < 0:
        return
    buckets: dict[tuple, list[int]] = {}
    canon: list[dict] = []
    for r in rows:
        hashes = r["phash"].split(",")
        nbits = 64 * len(hashes)
        bits = int("".join(hashes), 16)
        width = math.ceil(nbits / min(max_distance + 1, nbits))
        bands = [
            (len(hashes), b, (bits >> (b * width)) & ((1 << width) - 1))
            for b in range(math.ceil(nbits / width))
        ]
        candidates = sorted({i for band in bands for i in buckets.get(band, [])})
        for i in candidates:
            other = canon[i]["phash"].split(",")
            if sum(hamming(a, b) for a, b in zip(hashes, other)) <= max_distance:
                r.update(keep=False, reason="duplicate", reasons="duplicate", duplicate_of=canon[i]["id"])
                break
        else:
            for band in bands:
                buckets.setdefault(band, []).append(len(canon))
            canon.append(r)


def write_table(rows: list[dict], path: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pa.schema([(k, getattr(pa, t)()) for k, t in COLUMNS.items()])
    table = pa.Table.from_pylist(rows, schema=schema)
    pq.write_table(table, f"{path}.tmp")
    os.replace(f"{path}.tmp", path)


def write_clips_csv(rows: list[dict], path: str) -> None:
    with open(f"{path}.tmp", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "start", "end", "caption"])
        for r in rows:
            w.writerow([r["path"], r["start"], r["end"], r["caption"]])
    os.replace(f"{path}.tmp", path)


def finalize(cfg: CurateConfig, jobs: list[VideoJob], results: dict[str, dict]) -> Summary:
    from mugv.data.prep.pipeline import PrepConfig

    wanted = {j.video for j in jobs}
    rows = clip_rows(
        [r for k, r in results.items() if k in wanted], BucketTable.from_config(cfg.clips.buckets)
    )
    apply_filters(rows, cfg.filters)
    out = cfg.output
    write_table(rows, os.path.join(out, "clips.parquet"))
    csv_path = os.path.abspath(os.path.join(out, "clips.csv"))
    write_clips_csv([r for r in rows if r["keep"]], csv_path)
    save_config(
        PrepConfig(captions=csv_path, fps=cfg.clips.fps, buckets=cfg.clips.buckets),
        os.path.join(out, "prep.yaml"),
    )
    summary = Summary.from_rows(rows, cfg.filters, len(jobs), {k: v for k, v in FILTERS.items()})
    summary.write(out)
    write_histograms(rows, SCORES, cfg.filters, os.path.join(out, "hist"))
    return summary
