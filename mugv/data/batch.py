"""`LatentBatch`: the one batch type the trainer consumes.

Every micro-batch holds samples of a single latent bucket (same T, H, W), so nothing is
padded on the video side. Fields (B samples, L text tokens, Ct text channels):

    latents        [B, 24, T, H, W] float32  normalised VAE latents (model units)
    y              [B, 1, L, Ct]    float32  text features; rows past a sample's length are 0
    mask           [B, L]           bool     True for real text tokens
    x_mask         [B, T]           bool     True = frame is denoised; False = clean
                                             conditioning frame (I2V: frame 0 is False)
    fps            [B]              float32  frames per second of the clip (images: the
                                             configured default)
    frame_indices  [B, T + 2]       int64    temporal RoPE positions, 0..T+1
    pixel_size     [B, 2]           int64    (H_px, W_px) of the encoded pixels = 8 * (H, W)
    tasks          list[str]                 per sample: "t2i", "t2v" or "i2v"
    bucket         str                       "TxHxW" in latent units, e.g. "14x90x160"
    ids            list[str]                 sample ids
    skipped        list[str]                 ids of planned samples that were bad and left out
                                             (replaced by others of the bucket); see
                                             mugv.data.dataset
    bad            list[(str, str)]          (id, reason) of samples found bad while building
                                             this batch (each once per loader)
    planned        int                       samples the sampler planned for this batch
    stream_index   int                       position of this micro-batch in the global
                                             batch stream (see mugv.data.sampler)
    paired         bool                      preference pairs: samples 2k and 2k + 1 are the
                                             chosen and the rejected clip of one pair (same
                                             caption and bucket; see mugv.data.pairs)

    bad            list[(id, reason)]        samples found bad while building this batch
                                             (the loader counts and quarantines them)

`num_tokens` is the DiT sequence length per sample (T * ceil(H/2) * ceil(W/2) + 2). A batch may
have 0 samples (nothing of its bucket was readable): the trainer skips such a step.

`PackedBatch`: a packed micro-batch (data.packing), samples of several buckets that the model
runs as one sequence: `parts`, one LatentBatch per bucket (its samples of one shape), plus the
same per-micro-batch fields. Both types have `parts` (a LatentBatch is its own only part),
`ids`, `tasks`, `skipped`, `bad`, `planned`, `stream_index`, `len`, `to` and `pin_memory`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from mugv.data.buckets import num_tokens as _num_tokens

TENSOR_FIELDS = ("latents", "y", "mask", "x_mask", "fps", "frame_indices", "pixel_size")


@dataclass
class LatentBatch:
    latents: torch.Tensor
    y: torch.Tensor
    mask: torch.Tensor
    x_mask: torch.Tensor
    fps: torch.Tensor
    frame_indices: torch.Tensor
    pixel_size: torch.Tensor
    tasks: list[str]
    bucket: str
    ids: list[str]
    skipped: list[str] = field(default_factory=list)
    planned: int = 0
    stream_index: int = -1
    paired: bool = False
    bad: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return self.latents.shape[0]

    @property
    def num_tokens(self) -> int:
        """DiT tokens per sample, start and end tokens included."""
        _, _, t, h, w = self.latents.shape
        return _num_tokens(t, h, w)

    @property
    def parts(self) -> list[LatentBatch]:
        return [self]

    def _map(self, fn) -> LatentBatch:
        return dataclasses.replace(self, **{k: fn(getattr(self, k)) for k in TENSOR_FIELDS})

    def to(self, device: torch.device | str, non_blocking: bool = False) -> LatentBatch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> LatentBatch:
        """Called by torch's DataLoader when pin_memory=True."""
        return self._map(lambda t: t.pin_memory())


@dataclass
class PackedBatch:
    parts: list[LatentBatch]  # one per bucket, in the order the planner packed them
    stream_index: int = -1

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    @property
    def ids(self) -> list[str]:
        return [i for p in self.parts for i in p.ids]

    @property
    def tasks(self) -> list[str]:
        return [t for p in self.parts for t in p.tasks]

    @property
    def skipped(self) -> list[str]:
        return [i for p in self.parts for i in p.skipped]

    @property
    def bucket(self) -> str:
        return "+".join(p.bucket for p in self.parts)

    @property
    def bad(self) -> list[tuple[str, str]]:
        return [b for p in self.parts for b in p.bad]

    @property
    def planned(self) -> int:
        return sum(p.planned for p in self.parts)

    @property
    def num_tokens(self) -> int:
        """DiT tokens of the whole packed sequence (start and end tokens included)."""
        return sum(len(p) * p.num_tokens for p in self.parts)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedBatch:
        return dataclasses.replace(self, parts=[p.to(device, non_blocking) for p in self.parts])

    def pin_memory(self) -> PackedBatch:
        return dataclasses.replace(self, parts=[p.pin_memory() for p in self.parts])
