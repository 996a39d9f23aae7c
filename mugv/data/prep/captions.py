"""Prep inputs: a CSV or JSONL file of (media path, caption) rows.

Rows may also carry `start` and `end` (source frame indices, end exclusive; both or neither):
the item is then that sub-range of the video, as in the clips CSV of `mugv curate`, and its key
is `path[start:end]`, so several clips of one source video are distinct items."""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass


@dataclass(frozen=True)
class PrepItem:
    key: str  # the path as written in the captions file (the item's identity in the dataset)
    path: str  # resolved file path
    caption: str
    frames: tuple[int, int] | None = None  # (start, end) source frames of a video; None = whole file


def read_rows(path: str, what: str, media_root: str = "") -> tuple[list[dict], str]:
    """The rows of a prep input file `path` (.csv with a header, or .jsonl; `what` names it in
    errors) and the folder its relative media paths resolve against (media_root, default: the
    file's own folder)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file not found: {path}")
    root = media_root or os.path.dirname(os.path.abspath(path))
    if path.endswith(".csv"):
        with open(path, newline="") as f:
            return list(csv.DictReader(f)), root
    if not path.endswith(".jsonl"):
        raise ValueError(f"{path}: {what} must be a .csv or .jsonl file")
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{n}: not valid JSON ({err})") from None
    return rows, root


def read_captions(
    path: str, path_column: str = "path", caption_column: str = "caption", media_root: str = ""
) -> list[PrepItem]:
    """Rows of a .csv (with a header) or .jsonl file; relative paths resolve against media_root
    (default: the captions file's directory). Duplicate paths keep their first caption."""
    rows, root = read_rows(path, "captions", media_root)
    items, seen = [], set()
    for n, row in enumerate(rows, 1):
        if path_column not in row or caption_column not in row:
            raise ValueError(
                f"{path}: row {n} lacks column {path_column!r} or {caption_column!r} (has {sorted(row)})"
            )
        file = str(row[path_column])
        frames = _frame_range(path, n, row)
        key = file if frames is None else f"{file}[{frames[0]}:{frames[1]}]"
        if key in seen:
            continue
        seen.add(key)
        resolved = file if os.path.isabs(file) else os.path.join(root, file)
        items.append(PrepItem(key, resolved, str(row[caption_column]), frames))
    return items


def _frame_range(path: str, n: int, row: dict) -> tuple[int, int] | None:
    start, end = row.get("start"), row.get("end")
    if start in (None, "") and end in (None, ""):
        return None
    try:
        a, b = int(start), int(end)
    except (TypeError, ValueError):
        raise ValueError(f"{path}: row {n}: start={start!r} / end={end!r} are not frame numbers") from None
    if not 0 <= a < b:
        raise ValueError(f"{path}: row {n}: frame range start={a} end={b} is empty or negative")
    return a, b
