"""Decoding source videos for curation with PyAV: every frame in decode order, numbered from 0.

Frame numbers are the positions in this sequence, the same numbering `mugv prep` uses for the
`start` / `end` columns of a clips CSV.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

from mugv.data.prep.media import MediaError


@dataclass(frozen=True)
class VideoInfo:
    fps: float
    width: int
    height: int


def probe(path: str) -> VideoInfo:
    if not os.path.isfile(path):
        raise MediaError("missing", path)
    import av

    try:
        with av.open(path) as container:
            if not container.streams.video:
                raise MediaError("unreadable", f"{path}: no video stream")
            stream = container.streams.video[0]
            fps = float(stream.average_rate or stream.guessed_rate or 0)
            w, h = stream.codec_context.width, stream.codec_context.height
    except MediaError:
        raise
    except Exception as err:  # noqa: BLE001 - any decoder error makes the file unreadable
        raise MediaError("unreadable", f"{path}: {type(err).__name__}: {err}") from None
    if fps <= 0 or w <= 0 or h <= 0:
        raise MediaError("unreadable", f"{path}: frame rate {fps} / size {w}x{h} unknown")
    return VideoInfo(fps, w, h)


def frames(path: str) -> Iterator:
    """av.VideoFrame objects of the first video stream, in decode order."""
    import av

    try:
        with av.open(path) as container:
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            yield from container.decode(stream)
    except Exception as err:  # noqa: BLE001
        raise MediaError("unreadable", f"{path}: {type(err).__name__}: {err}") from None
