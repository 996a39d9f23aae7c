"""Prep inputs for preference pairs: a CSV or JSONL file of (caption, chosen, rejected) rows.

    caption,chosen,rejected
    "a red circle moving right",clips/a_good.mp4,clips/a_bad.mp4

Each row is one prep item: both clips are read, cut and cropped into the same bucket (the chosen
clip's size, nearest its aspect ratio, and the longest table length that both clips fit), encoded
and written together with the caption's text (see pipeline.run_prep and mugv.data.pairs).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from mugv.data.buckets import BucketTable
from mugv.data.prep.captions import read_rows
from mugv.data.prep.media import Clip, MediaError, is_image, read_image, read_video

COLUMNS = ("caption", "chosen", "rejected")


@dataclass(frozen=True)
class PairItem:
    key: str  # "chosen|rejected" as written in the pairs file: the pair's identity in the dataset
    caption: str
    chosen: str  # resolved file paths
    rejected: str


def read_pairs(path: str, media_root: str = "") -> list[PairItem]:
    """Rows of a .csv (with a header) or .jsonl file with columns caption, chosen, rejected;
    relative paths resolve against media_root (default: the file's directory). A repeated
    (chosen, rejected) row keeps its first caption."""
    rows, root = read_rows(path, "pairs", media_root)
    items, seen = [], set()
    for n, row in enumerate(rows, 1):
        missing = [c for c in COLUMNS if not str(row.get(c) or "").strip()]
        if missing:
            raise ValueError(f"{path}: row {n} lacks {missing} (columns: {', '.join(COLUMNS)})")
        chosen, rejected = str(row["chosen"]), str(row["rejected"])
        if chosen == rejected:
            raise ValueError(f"{path}: row {n}: chosen and rejected are the same file {chosen!r}")
        key = f"{chosen}|{rejected}"
        if key in seen:
            continue
        seen.add(key)
        chosen, rejected = (p if os.path.isabs(p) else os.path.join(root, p) for p in (chosen, rejected))
        items.append(PairItem(key, str(row["caption"]), chosen, rejected))
    return items


def _read(path: str, table: BucketTable, fps: float) -> Clip:
    return (read_image(path, table, fps) if is_image(path) else read_video(path, table, fps, 1))[0]


def read_pair(item: PairItem, table: BucketTable, fps: float) -> tuple[Clip, Clip]:
    """(chosen, rejected) clips of one bucket: the chosen clip's size and the shorter length; a
    clip read at another shape is read again from a table of just that bucket (centre crop,
    centred clip)."""
    if is_image(item.chosen) != is_image(item.rejected):
        raise MediaError("pair_mismatch", f"{item.key}: an image is paired with a video")
    clips = [_read(item.chosen, table, fps), _read(item.rejected, table, fps)]
    frames = min(c.pixels.shape[0] for c in clips)
    size = tuple(clips[0].pixels.shape[2:])
    one = BucketTable(sizes=(size,), num_frames=(frames,))
    return tuple(  # type: ignore[return-value]
        c if (c.pixels.shape[0], *c.pixels.shape[2:]) == (frames, *size) else _read(p, one, fps)
        for c, p in zip(clips, (item.chosen, item.rejected), strict=True)
    )
