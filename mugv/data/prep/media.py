"""Reading videos and images for prep: frame-rate resampling, clip cutting, resize + centre crop.

Videos are decoded with PyAV (only the wanted frames are converted, each resized at once, so
only bucket-sized frames are kept); if PyAV fails, decord is tried. Images are read with Pillow.
Every frame and image is resized by mugv.utils.video.resize_crop (Pillow bicubic, centre crop). Output pixels are
uint8 [F, 3, H, W] at the bucket size; `to_unit_range` maps them to [-1, 1] floats.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch

from mugv.data.buckets import BucketTable
from mugv.utils.video import resize_crop

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")


class MediaError(Exception):
    """A prep input that cannot become a sample; `reason` is a short category for the summary."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclass
class Clip:
    pixels: torch.Tensor  # [F, 3, H, W] uint8, F = 8k+1 (1 for images)
    fps: float
    start_frame: int  # in the resampled frame sequence (of the frame range, when one is given)


def is_image(path: str) -> bool:
    return path.lower().endswith(IMAGE_EXTS)


def resampled_indices(num_src: int, src_fps: float, target_fps: float) -> tuple[list[int], float]:
    """Source frame indices giving `target_fps` (never above the source rate) and the actual fps."""
    fps = min(target_fps, src_fps) if target_fps > 0 else src_fps
    step = src_fps / fps
    n = int(math.floor((num_src - 1) / step + 1e-9)) + 1 if num_src > 0 else 0
    return [min(num_src - 1, int(round(k * step))) for k in range(n)], fps


def plan_clips(num_frames: int, table: BucketTable, max_clips: int) -> tuple[int, list[int]]:
    """(clip length, start offsets) for a video of `num_frames` resampled frames: the longest
    table length that fits, up to max_clips non-overlapping clips spread evenly over the video."""
    length = table.longest_fitting(num_frames, video=True)
    if length is None:
        shortest = min(f for f in table.num_frames if f > 1) if any(f > 1 for f in table.num_frames) else None
        raise MediaError("too_short", f"{num_frames} frames after resampling, shortest clip is {shortest}")
    n = max(1, min(max_clips, num_frames // length))
    if n == 1:
        return length, [(num_frames - length) // 2]
    return length, [round(c * (num_frames - length) / (n - 1)) for c in range(n)]


def read_video(
    path: str, table: BucketTable, target_fps: float, max_clips: int, frames: tuple[int, int] | None = None
) -> list[Clip]:
    """Clips of the video, or of its source frames [start, end) when `frames` is given."""
    if not os.path.isfile(path):
        raise MediaError("missing", path)
    errors = []
    for backend in (_read_av, _read_decord):
        try:
            return backend(path, table, target_fps, max_clips, frames)
        except MediaError:
            raise
        except Exception as err:  # noqa: BLE001 - try the next decoder
            errors.append(f"{backend.__name__[6:]}: {type(err).__name__}: {err}")
    raise MediaError("unreadable", f"{path}: " + "; ".join(errors))


def _select(num_src: int, src_fps: float, table: BucketTable, target_fps: float, max_clips: int, frames=None):
    """-> (fps, clip length, starts, {source index: [positions in the output clips]})."""
    first, end = frames or (0, num_src)
    if end > num_src:
        raise MediaError("bad_range", f"frames [{first}:{end}] but the video has {num_src}")
    idx, fps = resampled_indices(end - first, src_fps, target_fps)
    idx = [first + i for i in idx]
    length, starts = plan_clips(len(idx), table, max_clips)
    wanted: dict[int, list[tuple[int, int]]] = {}
    for c, s in enumerate(starts):
        for k in range(length):
            wanted.setdefault(idx[s + k], []).append((c, k))
    return fps, length, starts, wanted


def _read_av(path: str, table: BucketTable, target_fps: float, max_clips: int, frames=None) -> list[Clip]:
    import av

    with av.open(path) as container:
        if not container.streams.video:
            raise MediaError("unreadable", f"{path}: no video stream")
        stream = container.streams.video[0]
        src_fps = float(stream.average_rate or stream.guessed_rate or 0)
        num_src = stream.frames or sum(1 for p in container.demux(stream) if p.size)
        if src_fps <= 0 or num_src <= 0:
            raise MediaError("unreadable", f"{path}: frame rate {src_fps} / frame count {num_src} unknown")
        container.seek(0)
        out_h, out_w = table.nearest_size(stream.codec_context.height, stream.codec_context.width)
        fps, length, starts, wanted = _select(num_src, src_fps, table, target_fps, max_clips, frames)
        clips = torch.empty(len(starts), length, 3, out_h, out_w, dtype=torch.uint8)
        last, filled = max(wanted), 0
        for j, frame in enumerate(container.decode(stream)):
            if j in wanted:
                rgb = resize_crop(frame.to_ndarray(format="rgb24"), out_h, out_w)
                chw = torch.from_numpy(rgb).permute(2, 0, 1)
                for c, k in wanted[j]:
                    clips[c, k] = chw
                    filled += 1
            if j >= last:
                break
    if filled < len(starts) * length:
        raise RuntimeError(f"decoded fewer frames than the header's {num_src}")
    return [Clip(clips[c], fps, s) for c, s in enumerate(starts)]


def _read_decord(path: str, table: BucketTable, target_fps: float, max_clips: int, frames=None) -> list[Clip]:
    import decord

    vr = decord.VideoReader(path, num_threads=1)
    num_src, src_fps = len(vr), float(vr.get_avg_fps())
    src_h, src_w = vr[0].shape[:2]
    out_h, out_w = table.nearest_size(src_h, src_w)
    fps, length, starts, wanted = _select(num_src, src_fps, table, target_fps, max_clips, frames)
    clips = torch.empty(len(starts), length, 3, out_h, out_w, dtype=torch.uint8)
    for j, places in wanted.items():
        chw = torch.from_numpy(resize_crop(vr[j].asnumpy(), out_h, out_w)).permute(2, 0, 1)  # [3, H, W]
        for c, k in places:
            clips[c, k] = chw
    return [Clip(clips[c], fps, s) for c, s in enumerate(starts)]


def read_image(path: str, table: BucketTable, fps: float) -> list[Clip]:
    if not os.path.isfile(path):
        raise MediaError("missing", path)
    try:
        from PIL import Image

        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"))
    except Exception as err:  # noqa: BLE001
        raise MediaError("unreadable", f"{path}: {type(err).__name__}: {err}") from None
    out_h, out_w = table.nearest_size(*rgb.shape[:2])
    chw = torch.from_numpy(resize_crop(rgb, out_h, out_w)).permute(2, 0, 1)
    return [Clip(chw[None], fps, 0)]


def to_unit_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 [F, 3, H, W] -> float [1, 3, F, H, W] in [-1, 1] (the VAE's input layout)."""
    return (pixels.float() / 127.5 - 1.0).permute(1, 0, 2, 3)[None]
