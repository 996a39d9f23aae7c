"""`run_curation`: input videos -> per-video results (resumable, sharded) -> the clip table.

Output directory:

    config.yaml                  the run's config; later runs must match it except `filters`
    parts/shard-I-of-N.jsonl     one JSON line per finished video (written by the driver only)
    clips.parquet                every clip with all scores, `keep` and the drop `reason`
    clips.csv                    the kept clips: path,start,end,caption (read by `mugv prep`)
    prep.yaml                    a PrepConfig with the same fps and buckets, for `mugv prep --config`
    summary.json, hist/*.png     kept / dropped counts per filter, histograms of each score

Videos are split by index (video i goes to shard i % num_shards). A video with a line in any
parts file is finished and skipped, so rerunning an interrupted command (or one with another
shard count) resumes; a line cut short by a kill is dropped and its video redone.
"""

from __future__ import annotations

import csv
import glob
import importlib.util
import json
import os
import time

from mugv.config.loader import ConfigError, load_config, save_config, to_dict
from mugv.curate.config import CurateConfig
from mugv.curate.engine import ENGINES
from mugv.curate.models import load_model
from mugv.curate.table import Summary, finalize
from mugv.curate.video import VideoJob
from mugv.utils.logging import get_logger

log = get_logger("curate")

VIDEO_EXTS = (".mp4", ".mov", ".mkv", ".avi", ".webm", ".m4v", ".mpg", ".mpeg", ".ts", ".flv", ".wmv")
SCORE_SECTIONS = ("shots", "clips", "analysis", "models")  # must not change within one output


def list_videos(source: str) -> list[VideoJob]:
    """A directory (videos found recursively, keyed by relative path) or a CSV with a `path`
    column and an optional `caption` column (relative paths resolve against the CSV's folder)."""
    if os.path.isdir(source):
        jobs = []
        for root, dirs, files in os.walk(source):
            dirs.sort()
            for name in sorted(files):
                if name.lower().endswith(VIDEO_EXTS):
                    full = os.path.join(root, name)
                    jobs.append(VideoJob(os.path.relpath(full, source), os.path.abspath(full)))
    elif source.endswith(".csv") and os.path.isfile(source):
        with open(source, newline="") as f:
            reader = csv.DictReader(f)
            if "path" not in (reader.fieldnames or []):
                raise ConfigError(f"input {source}: needs a `path` column (has {reader.fieldnames})")
            base = os.path.dirname(os.path.abspath(source))
            jobs, seen = [], set()
            for row in reader:
                key = row["path"]
                if key and key not in seen:
                    seen.add(key)
                    jobs.append(VideoJob(key, os.path.join(base, key), row.get("caption") or ""))
    else:
        raise ConfigError(f"input {source!r} is neither a directory nor an existing .csv file")
    if not jobs:
        raise ConfigError(f"input {source}: no videos found ({', '.join(VIDEO_EXTS)})")
    return jobs


def read_parts(output: str) -> dict[str, dict]:
    """video key -> its result, from every parts file (first line wins; broken lines skipped)."""
    done: dict[str, dict] = {}
    for path in sorted(glob.glob(os.path.join(output, "parts", "*.jsonl"))):
        with open(path) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue
                done.setdefault(row["video"], row)
    return done


class PartWriter:
    """Appends result lines to one parts file, each flushed to disk; a partial last line left
    by a killed run is cut off first."""

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.f = open(path, "a+b")  # noqa: SIM115 - closed by close()
        self.f.seek(0, os.SEEK_END)
        if self.f.tell():
            self.f.seek(0)
            data = self.f.read()
            if not data.endswith(b"\n"):
                self.f.truncate(data.rfind(b"\n") + 1)
        self.f.seek(0, os.SEEK_END)

    def write(self, line: str) -> None:
        self.f.write(line.encode() + b"\n")
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()


def check_output_config(cfg: CurateConfig) -> None:
    """The output's config.yaml (if any) must match `cfg` outside `filters`; then save `cfg`."""
    path = os.path.join(cfg.output, "config.yaml")
    if os.path.isfile(path):
        old, new = to_dict(load_config(CurateConfig, path)), to_dict(cfg)
        for section in SCORE_SECTIONS:
            key, was, now = _first_difference(section, old[section], new[section])
            if key:
                raise ConfigError(
                    f"{cfg.output} was curated with {key} = {was}, this run has {now}; only `filters` may "
                    f"change (use another --output, or `mugv curate summary` to re-filter)"
                )
    os.makedirs(cfg.output, exist_ok=True)
    save_config(cfg, path)


def _first_difference(key: str, a, b) -> tuple[str, object, object]:
    if isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys():
        for k in a:
            found = _first_difference(f"{key}.{k}", a[k], b[k])
            if found[0]:
                return found
        return "", None, None
    return (key, a, b) if a != b else ("", None, None)


def run_curation(cfg: CurateConfig) -> Summary:
    if not cfg.input or not cfg.output:
        raise ConfigError("curate needs `input` and `output`")
    if cfg.engine == "ray" and importlib.util.find_spec("ray") is None:
        raise ConfigError("engine=ray needs Ray Data: pip install 'mugv[ray]'")
    cfg.input, cfg.output = os.path.abspath(cfg.input), os.path.abspath(cfg.output)
    jobs = list_videos(cfg.input)
    for m in cfg.models:  # a broken model directory fails here, before any video
        load_model(m)
    check_output_config(cfg)
    done = read_parts(cfg.output)
    mine = [j for i, j in enumerate(jobs) if i % cfg.num_shards == cfg.shard]
    todo = [j for j in mine if j.video not in done]
    log.info(
        f"curate shard {cfg.shard}/{cfg.num_shards}: {len(todo)} of {len(mine)} videos to do "
        f"({len(mine) - len(todo)} already done), engine {cfg.engine} -> {cfg.output}"
    )
    parts = os.path.join(cfg.output, "parts", f"shard-{cfg.shard:05d}-of-{cfg.num_shards:05d}.jsonl")
    writer = PartWriter(parts)
    start = last = time.monotonic()
    count = {"videos": 0, "clips": 0}

    def emit(line: str) -> None:
        nonlocal last
        writer.write(line)
        count["videos"] += 1
        count["clips"] += len(json.loads(line)["clips"])
        now = time.monotonic()
        if now - last >= cfg.log_every_s:
            rate = count["videos"] / (now - start)
            log.info(
                f"curate: {count['videos']}/{len(todo)} videos, {count['clips']} clips, "
                f"{rate:.2f} videos/s, eta {(len(todo) - count['videos']) / rate / 60:.1f} min"
            )
            last = now

    try:
        if todo:
            ENGINES[cfg.engine](todo, cfg, emit)
    finally:
        writer.close()
    summary = finalize(cfg, jobs, read_parts(cfg.output))
    summary.processed = count["videos"]
    return summary


def summarize(output: str, overrides: list[str] = ()) -> Summary:
    """Rebuild the table, CSV and summary of `output` from its stored scores, with `filters`
    overridden (e.g. filters.min_motion=2): nothing is decoded again."""
    path = os.path.join(output, "config.yaml")
    if not os.path.isfile(path):
        raise ConfigError(f"{output}: no config.yaml (not a `mugv curate run` output)")
    bad = [o for o in overrides if not o.startswith("filters.")]
    if bad:
        raise ConfigError(f"summary re-applies filters only; {bad[0]!r} would change the scores")
    cfg = load_config(CurateConfig, path, overrides)
    cfg.output = output
    save_config(cfg, path)
    results = read_parts(output)
    try:
        jobs = list_videos(cfg.input)
    except ConfigError as err:  # the input moved: summarise what was curated
        log.warning(f"curate summary: {err}; counting only the curated videos")
        jobs = [VideoJob(v["video"], v["path"]) for v in results.values()]
    return finalize(cfg, jobs, results)
