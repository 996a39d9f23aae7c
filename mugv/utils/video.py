"""Write and read mp4 files with PyAV (`av`), imported lazily."""

from __future__ import annotations

import os
from fractions import Fraction

import numpy as np
import torch


def write_video(path: str, frames, fps: float = 30.0, codec: str = "libx264", crf: int = 18) -> str:
    """Write uint8 frames [T, H, W, 3] (torch or numpy, RGB) to an mp4 (H.264, yuv420p).

    H and W must be even (yuv420p). The file is written under a temporary name and renamed.
    Returns `path`."""
    import av

    arr = frames.detach().cpu().numpy() if isinstance(frames, torch.Tensor) else np.asarray(frames)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(
            f"write_video({path}): frames must be uint8 [T, H, W, 3], got {arr.dtype} {list(arr.shape)}"
        )
    T, H, W, _ = arr.shape
    if T == 0 or H % 2 or W % 2:
        raise ValueError(f"write_video({path}): need >= 1 frame and even height/width, got {T} x {H} x {W}")
    if fps <= 0:
        raise ValueError(f"write_video({path}): fps must be positive, got {fps}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.mp4"
    with av.open(tmp, mode="w") as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": str(crf)}
        for frame in arr:
            container.mux(
                stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24"))
            )
        container.mux(stream.encode())  # flush
    os.replace(tmp, path)
    return path


def read_video(path: str) -> np.ndarray:
    """Decode every frame of a video file -> uint8 [T, H, W, 3] RGB."""
    import av

    if not os.path.isfile(path):
        raise FileNotFoundError(f"video not found: {path}")
    with av.open(path) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    if not frames:
        raise ValueError(f"{path}: no video frames")
    return np.stack(frames)


def video_fps(path: str) -> float:
    import av

    with av.open(path) as container:
        return float(container.streams.video[0].average_rate)


def to_uint8_frames(pixels: torch.Tensor) -> torch.Tensor:
    """Pixels [3, T, H, W] in [-1, 1] -> uint8 [T, H, W, 3]."""
    if pixels.dim() != 4 or pixels.shape[0] != 3:
        raise ValueError(f"pixels must be [3, T, H, W], got {list(pixels.shape)}")
    x = ((pixels.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).contiguous()


def write_image(path: str, image) -> str:
    """Write a uint8 [H, W, 3] RGB image as PNG."""
    import av

    arr = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(
            f"write_image({path}): image must be uint8 [H, W, 3], got {arr.dtype} {list(arr.shape)}"
        )
    with av.open(path, mode="w", format="image2") as container:
        stream = container.add_stream("png")
        stream.width, stream.height, stream.pix_fmt = arr.shape[1], arr.shape[0], "rgb24"
        container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(arr), format="rgb24")))
        container.mux(stream.encode())
    return path


def read_image(path: str) -> np.ndarray:
    """Decode an image file with Pillow (PNG, JPEG, ...; as the release) -> uint8 [H, W, 3] RGB;
    a file Pillow cannot open is read as a video's first frame."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.isfile(path):
        raise FileNotFoundError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except UnidentifiedImageError:
        return read_video(path)[0]


def resize_crop(image, height: int, width: int, resample: str = "bicubic") -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [height, width, 3]: scaled with Pillow (aspect kept) so it covers the
    target, then centre-cropped. As the release does it: the covering side is round(side * scale)
    and the crop offset round(excess / 2) (Python rounding). resample: "bicubic" | "bilinear"."""
    from PIL import Image

    arr = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 3 or arr.shape[-1] != 3:
        raise ValueError(f"resize_crop: image must be uint8 [H, W, 3], got {arr.dtype} {list(arr.shape)}")
    modes = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}
    if resample not in modes:
        raise ValueError(f"resize_crop: resample must be one of {sorted(modes)}, got {resample!r}")
    h, w = arr.shape[:2]
    rh, rw = height / h, width / w
    sh, sw = (height, round(w * rh)) if rh > rw else (round(h * rw), width)
    top, left = round((sh - height) / 2.0), round((sw - width) / 2.0)
    scaled = np.asarray(Image.fromarray(arr).resize((sw, sh), modes[resample]))
    return np.array(scaled[top : top + height, left : left + width])  # a writable copy
