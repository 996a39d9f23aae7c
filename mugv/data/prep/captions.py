"""Prep inputs: a CSV or JSONL file of (media path, caption) rows."""

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


def read_captions(
    path: str, path_column: str = "path", caption_column: str = "caption", media_root: str = ""
) -> list[PrepItem]:
    """Rows of a .csv (with a header) or .jsonl file; relative paths resolve against media_root
    (default: the captions file's directory). Duplicate paths keep their first caption."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"captions file not found: {path}")
    root = media_root or os.path.dirname(os.path.abspath(path))
    rows: list[dict] = []
    if path.endswith(".jsonl"):
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{path}:{n}: not valid JSON ({err})") from None
    elif path.endswith(".csv"):
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
    else:
        raise ValueError(f"{path}: captions must be a .csv or .jsonl file")
    items, seen = [], set()
    for n, row in enumerate(rows, 1):
        if path_column not in row or caption_column not in row:
            raise ValueError(
                f"{path}: row {n} lacks column {path_column!r} or {caption_column!r} (has {sorted(row)})"
            )
        key = str(row[path_column])
        if key in seen:
            continue
        seen.add(key)
        items.append(
            PrepItem(key, key if os.path.isabs(key) else os.path.join(root, key), str(row[caption_column]))
        )
    return items
