"""Buckets: the clip shapes data is cut to, and how many samples of a shape fit a micro-batch.

Pixel sizes in a bucket table must be multiples of 16 (8 for the VAE, 2 for the DiT patch),
so that a clip decodes back to exactly its own size. Frame counts are 8k+1 (1 = image).
A latent bucket is named "TxHxW" in latent units (pixels / 8, frames (F - 1) / 8 + 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field


def latent_shape(num_frames: int, height: int, width: int) -> tuple[int, int, int]:
    """Pixel clip (F, H_px, W_px) -> latent (T, H, W) under the 8x8x8 VAE."""
    if num_frames < 1 or (num_frames - 1) % 8:
        raise ValueError(f"frame count {num_frames} is not of the form 8k+1")
    if height % 8 or width % 8:
        raise ValueError(f"pixel size {height}x{width} is not a multiple of 8")
    return (num_frames - 1) // 8 + 1, height // 8, width // 8


def num_tokens(t: int, h: int, w: int) -> int:
    """DiT sequence length of one latent: T * ceil(H/2) * ceil(W/2) video tokens + start/end."""
    return t * math.ceil(h / 2) * math.ceil(w / 2) + 2


def bucket_name(t: int, h: int, w: int) -> str:
    return f"{t}x{h}x{w}"


def parse_size(text: str) -> tuple[int, int]:
    """'720x1280' -> (720, 1280)."""
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"bucket size {text!r} is not of the form HEIGHTxWIDTH, e.g. '720x1280'")
    return int(parts[0]), int(parts[1])


@dataclass
class BucketTableConfig:
    """Target clip shapes for data preparation. `sizes` are 'HxW' in pixels."""

    sizes: list[str] = field(default_factory=lambda: ["720x1280", "1280x720", "960x960"])
    num_frames: list[int] = field(default_factory=lambda: [105, 73])

    def validate(self) -> None:
        BucketTable.from_config(self)


@dataclass(frozen=True)
class BucketTable:
    sizes: tuple[tuple[int, int], ...]
    num_frames: tuple[int, ...]

    def __post_init__(self):
        if not self.sizes:
            raise ValueError("bucket table has no sizes")
        for h, w in self.sizes:
            if h <= 0 or w <= 0 or h % 16 or w % 16:
                raise ValueError(
                    f"bucket size {h}x{w} is not a positive multiple of 16 pixels in both axes "
                    f"(nearest valid: {_round16(h)}x{_round16(w)})"
                )
        if not self.num_frames:
            raise ValueError("bucket table has no frame counts")
        for f in self.num_frames:
            if f < 1 or (f - 1) % 8:
                raise ValueError(f"bucket frame count {f} is not of the form 8k+1 (1, 9, 17, ..., 105)")

    @classmethod
    def from_config(cls, cfg: BucketTableConfig) -> BucketTable:
        return cls(tuple(parse_size(s) for s in cfg.sizes), tuple(sorted(set(cfg.num_frames), reverse=True)))

    def nearest_size(self, height: int, width: int) -> tuple[int, int]:
        """The table size whose aspect ratio is closest (in log space) to height/width; ties go
        to the larger area."""
        target = math.log(height / width)
        return min(self.sizes, key=lambda s: (abs(math.log(s[0] / s[1]) - target), -s[0] * s[1]))

    def longest_fitting(self, available_frames: int, video: bool = True) -> int | None:
        """Longest table frame count <= available_frames (videos skip the 1-frame entry)."""
        for f in self.num_frames:  # sorted descending
            if f <= available_frames and (f > 1 or not video):
                return f
        return None


def _round16(x: int) -> int:
    return max(16, int(round(x / 16)) * 16)


def batch_size_for(
    t: int, h: int, w: int, token_budget: int, max_batch_size: int, overrides: dict[str, int] | None = None
) -> int:
    """Micro-batch size of latent bucket (t, h, w): floor(budget / tokens), at least 1, at most
    max_batch_size; an entry in `overrides` (keyed by bucket name) wins."""
    name = bucket_name(t, h, w)
    if overrides and name in overrides:
        return int(overrides[name])
    return max(1, min(max_batch_size, token_budget // num_tokens(t, h, w)))
