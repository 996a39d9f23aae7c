"""The MUG-V video VAE (SPEC section 5): 8x8x8 compression to 24 normalised channels.

Encoding: every frame through the 2D encoder -> frame 0 repeated to fill its own 8-frame
group -> every 8-frame group through the temporal encoder independently -> (z - shift)/scale.
Decoding: z*scale + shift -> latent frame 0 alone (last of its 8 frames kept), the rest in
chunks of `decode_chunk` latent frames, each chunk through the temporal then the 2D decoder.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from mugv.utils.checkpoint_io import load_release_state_dict
from mugv.utils.logging import get_logger
from mugv.vae.spatial import SpatialVAE
from mugv.vae.temporal import TemporalVAE

TIME_FACTOR = 8
LOGVAR_RANGE = (-30.0, 20.0)

# Per-channel latent statistics of the release (z = (z_raw - shift) / scale).
RELEASE_SHIFT = (
    -0.0194091796875, 0.09619140625, -0.796875, 0.1591796875, -0.2578125, 0.359375,
    -0.3203125, -0.287109375, -0.0069580078125, 0.3046875, 0.310546875, -0.451171875,
    -0.1728515625, 0.369140625, 0.2177734375, -3.075599670410156e-05, 0.1630859375, -0.267578125,
    -0.1962890625, -0.1298828125, -0.28515625, -0.515625, 0.5859375, -0.34375,
)  # fmt: skip
RELEASE_SCALE = (
    0.8817, 0.6523, 0.9152, 1.2117, 3.3516, 0.7528, 0.8177, 0.8637, 0.9075, 2.8875, 0.8980, 1.1202,
    1.0003, 2.5163, 0.6652, 1.2573, 0.7279, 1.0777, 1.5159, 0.8680, 1.1859, 1.0484, 2.4750, 1.5881,
)  # fmt: skip


def latent_frames(num_frames: int) -> int:
    """Pixel frames (8k+1) -> latent frames (k+1): 105 -> 14, 73 -> 10, 9 -> 2, 1 -> 1."""
    if not isinstance(num_frames, int) or num_frames < 1 or (num_frames - 1) % TIME_FACTOR:
        raise ValueError(f"frame count {num_frames!r} is not of the form 8k+1 (1, 9, 17, ..., 105)")
    return (num_frames - 1) // TIME_FACTOR + 1


def pixel_frames(num_latent: int) -> int:
    """Latent frames (k+1) -> pixel frames (8k+1): 14 -> 105, 10 -> 73, 2 -> 9, 1 -> 1."""
    if not isinstance(num_latent, int) or num_latent < 1:
        raise ValueError(f"latent frame count {num_latent!r} must be a positive integer")
    return (num_latent - 1) * TIME_FACTOR + 1


@dataclass
class VideoVAEConfig:
    """Architecture of the video VAE. Defaults are the release (`vae.pt`)."""

    spatial_channels: tuple[int, ...] = (128, 256, 512, 512)
    spatial_layers: int = 2
    spatial_groups: int = 32
    spatial_latent_channels: int = 4  # only sizes the unused SDXL conv_out / conv_in
    scaling_factor: float = 0.18215
    temporal_filters: int = 128
    temporal_res_blocks: int = 4
    temporal_multipliers: tuple[int, ...] = (1, 2, 2, 4)
    temporal_groups: int = 32
    latent_channels: int = 24
    decode_chunk: int = 6  # latent frames per temporal-decoder call (changes the numbers)
    frame_batch: int = 8  # frames per 2D-VAE call (memory only)
    group_batch: int = 8  # 8-frame groups per temporal-encoder call (memory only)
    shift: tuple[float, ...] = RELEASE_SHIFT
    scale: tuple[float, ...] = RELEASE_SCALE

    def __post_init__(self):
        self.spatial_channels = tuple(self.spatial_channels)
        self.temporal_multipliers = tuple(self.temporal_multipliers)
        self.shift, self.scale = tuple(self.shift), tuple(self.scale)
        if len(self.spatial_channels) != 4:
            raise ValueError(
                f"spatial_channels must have 4 entries (8x in space), got {self.spatial_channels}"
            )
        for name in ("shift", "scale"):
            if len(getattr(self, name)) != self.latent_channels:
                raise ValueError(
                    f"{name} has {len(getattr(self, name))} values, latent_channels is {self.latent_channels}"
                )
        if min(self.decode_chunk, self.frame_batch, self.group_batch) < 1:
            raise ValueError("decode_chunk, frame_batch and group_batch must be >= 1")

    @property
    def feature_channels(self) -> int:
        return self.spatial_channels[-1]


class VideoVAE(nn.Module):
    """Pixels [B, 3, 8k+1, H, W] in [-1, 1] <-> normalised latents [B, 24, k+1, H/8, W/8]."""

    def __init__(self, config: VideoVAEConfig | None = None):
        super().__init__()
        cfg = self.config = config or VideoVAEConfig()
        self.spatial_vae = SpatialVAE(
            cfg.spatial_channels, cfg.spatial_layers, cfg.spatial_groups,
            cfg.spatial_latent_channels, cfg.scaling_factor, cfg.frame_batch,
        )  # fmt: skip
        self.temporal_vae = TemporalVAE(
            cfg.feature_channels, cfg.latent_channels, cfg.temporal_filters,
            cfg.temporal_res_blocks, cfg.temporal_multipliers, cfg.temporal_groups,
        )  # fmt: skip
        self.register_buffer("shift", torch.tensor(cfg.shift).view(1, -1, 1, 1, 1))  # [1, 24, 1, 1, 1]
        self.register_buffer("scale", torch.tensor(cfg.scale).view(1, -1, 1, 1, 1))
        self.logvar = nn.Parameter(torch.tensor(4.0))  # VAE-training loss weight, kept for the layout

    latent_frames = staticmethod(latent_frames)
    pixel_frames = staticmethod(pixel_frames)

    @classmethod
    def from_release(
        cls,
        source: str | os.PathLike | Mapping[str, torch.Tensor],
        config: VideoVAEConfig | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> VideoVAE:
        """Build from a release `vae.pt` (path or state dict), every key required and used."""
        name = os.fspath(source) if isinstance(source, str | os.PathLike) else "state dict"
        sd = load_release_state_dict(name) if isinstance(source, str | os.PathLike) else dict(source)
        with torch.device("meta"):
            model = cls(config)
        expected = model.state_dict()
        missing = sorted(set(expected) - set(sd))
        unexpected = sorted(set(sd) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"{name} is not a MUG-V vae.pt for this config: {len(missing)} missing keys "
                f"{missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}"
            )
        for key, ref in expected.items():
            if tuple(sd[key].shape) != tuple(ref.shape):
                raise ValueError(
                    f"{name}: key {key} has shape {tuple(sd[key].shape)}, expected {tuple(ref.shape)}"
                )
        device = torch.device(device or "cpu")
        model.load_state_dict({k: v.to(device, dtype) for k, v in sd.items()}, strict=True, assign=True)
        get_logger(__name__).info("loaded video VAE from %s (%d tensors)", name, len(sd))
        return model.eval()

    @property
    def dtype(self) -> torch.dtype:
        return self.logvar.dtype

    def _check_pixels(self, pixels: torch.Tensor) -> None:
        if pixels.dim() != 5 or pixels.shape[1] != 3:
            raise ValueError(f"pixels must be [B, 3, F, H, W], got shape {tuple(pixels.shape)}")
        latent_frames(pixels.shape[2])
        h, w = pixels.shape[-2:]
        step = self.spatial_vae.downsample
        if h % step or w % step:
            raise ValueError(f"frame size {h}x{w} is not a multiple of {step}")

    def encode(
        self, pixels: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """[B, 3, 8k+1, H, W] -> [B, 24, k+1, H/8, W/8]: posterior mean (or a sample), normalised."""
        self._check_pixels(pixels)
        feats = self.spatial_vae.encode(pixels.to(self.dtype))  # [B, C, F, h, w]
        b, c, _, h, w = feats.shape
        head = feats[:, :, :1].expand(-1, -1, TIME_FACTOR - 1, -1, -1)
        feats = torch.cat([head, feats], dim=2)  # frame 0 fills its own group: [B, C, 8(k+1), h, w]
        groups = feats.unflatten(2, (-1, TIME_FACTOR)).transpose(1, 2).flatten(0, 1)  # [B*(k+1), C, 8, h, w]
        moments = torch.cat([self.temporal_vae.moments(g) for g in groups.split(self.config.group_batch)])
        moments = moments.squeeze(2).unflatten(0, (b, -1)).transpose(1, 2)  # [B, 2*24, k+1, h, w]
        mean, logvar = moments.chunk(2, dim=1)
        z = mean
        if sample:
            std = torch.exp(0.5 * logvar.clamp(*LOGVAR_RANGE))
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            z = mean + std * noise
        return (z - self.shift.to(z.dtype)) / self.scale.to(z.dtype)

    def decode(self, latents: torch.Tensor, out_device: torch.device | str | None = None) -> torch.Tensor:
        """[B, 24, T, h, w] normalised latents -> [B, 3, 8(T-1)+1, 8h, 8w] pixels (on out_device,
        default the latents' device).

        Decoded chunk by chunk: latent frame 0 alone, then `decode_chunk` latent frames at a time,
        each through the temporal decoder and straight on through the 2D decoder (`frame_batch`
        frames per call), so only one chunk's features are ever held; the result equals decoding
        all features first (the chunks are independent)."""
        if latents.dim() != 5 or latents.shape[1] != self.config.latent_channels:
            raise ValueError(
                f"latents must be [B, {self.config.latent_channels}, T, h, w], got shape {tuple(latents.shape)}"
            )
        out_device = torch.device(out_device) if out_device is not None else latents.device
        z = latents.to(self.dtype) * self.scale.to(self.dtype) + self.shift.to(self.dtype)
        tail = z[:, :, 1:].split(self.config.decode_chunk, dim=2) if z.shape[2] > 1 else ()
        chunks = [z[:, :, :1], *tail]
        pixels = []
        for i, chunk in enumerate(chunks):
            feats = self.temporal_vae.decode(chunk)  # [B, C, 8t, h, w]
            if i == 0:
                feats = feats[:, :, -1:]  # latent frame 0 is one pixel frame: the last of its 8
            pixels.append(self.spatial_vae.decode(feats).to(out_device))  # [B, 3, frames, 8h, 8w]
        return torch.cat(pixels, dim=2)
