"""The spatial half of the MUG-V VAE: an SDXL-shaped 2D KL autoencoder, truncated.

The encoder stops after its mid-block (512-channel features at 1/8 resolution) and the
decoder starts at its mid-block, as in the release (SPEC section 5). Parameter names follow
the diffusers `AutoencoderKL` layout so a release `vae.pt` loads without renaming; the
encoder's `conv_norm_out`/`conv_out` and the decoder's `conv_in` are kept (and stored in
`vae.pt`) but unused by the truncated forward passes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-6


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=EPS)


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv twice plus a (1x1-projected when widths differ) skip."""

    def __init__(self, cin: int, cout: int, groups: int):
        super().__init__()
        self.norm1 = _norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _norm(cout, groups)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return skip + h


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv after zero-padding one row/column at the bottom/right."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class SelfAttention2D(nn.Module):
    """Single-head self-attention over all H*W positions with a residual connection."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.group_norm = _norm(channels, groups)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        seq = self.group_norm(x).flatten(2).transpose(1, 2)  # [B, H*W, C]
        q, k, v = self.to_q(seq), self.to_k(seq), self.to_v(seq)
        out = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]  # one head
        out = self.to_out[0](out).transpose(1, 2).reshape(b, c, h, w)
        return x + out


class MidBlock2D(nn.Module):
    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock2D(channels, channels, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([SelfAttention2D(channels, groups)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        x = self.attentions[0](x)
        return self.resnets[1](x)


class _ResnetStack(nn.Module):
    """`num` resnets (cin -> cout, then cout -> cout) and an optional resampler."""

    def __init__(self, cin: int, cout: int, num: int, groups: int):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock2D(cin if i == 0 else cout, cout, groups) for i in range(num)]
        )

    def _run_resnets(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resnets:
            x = block(x)
        return x


class DownEncoderBlock2D(_ResnetStack):
    def __init__(self, cin: int, cout: int, num: int, groups: int, downsample: bool):
        super().__init__(cin, cout, num, groups)
        self.downsamplers = nn.ModuleList([Downsample2D(cout)]) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._run_resnets(x)
        return x if self.downsamplers is None else self.downsamplers[0](x)


class UpDecoderBlock2D(_ResnetStack):
    def __init__(self, cin: int, cout: int, num: int, groups: int, upsample: bool):
        super().__init__(cin, cout, num, groups)
        self.upsamplers = nn.ModuleList([Upsample2D(cout)]) if upsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._run_resnets(x)
        return x if self.upsamplers is None else self.upsamplers[0](x)


class SpatialEncoder(nn.Module):
    """Pixels [N, 3, H, W] -> features [N, C_last, H/2^(n-1), W/2^(n-1)] (mid-block output)."""

    def __init__(self, channels: tuple[int, ...], layers: int, groups: int, latent_channels: int):
        super().__init__()
        self.conv_in = nn.Conv2d(3, channels[0], 3, padding=1)
        cins = (channels[0], *channels[:-1])
        self.down_blocks = nn.ModuleList(
            [
                DownEncoderBlock2D(cin, cout, layers, groups, downsample=i < len(channels) - 1)
                for i, (cin, cout) in enumerate(zip(cins, channels, strict=True))
            ]
        )
        self.mid_block = MidBlock2D(channels[-1], groups)
        # Stored in the release checkpoint, unused by the truncated encoder.
        self.conv_norm_out = _norm(channels[-1], groups)
        self.conv_out = nn.Conv2d(channels[-1], 2 * latent_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        return self.mid_block(x)


class SpatialDecoder(nn.Module):
    """Features [N, C_last, h, w] (mid-block input) -> pixels [N, 3, h*2^(n-1), w*2^(n-1)]."""

    def __init__(self, channels: tuple[int, ...], layers: int, groups: int, latent_channels: int):
        super().__init__()
        # Stored in the release checkpoint, unused by the truncated decoder.
        self.conv_in = nn.Conv2d(latent_channels, channels[-1], 3, padding=1)
        self.mid_block = MidBlock2D(channels[-1], groups)
        rev = tuple(reversed(channels))
        cins = (rev[0], *rev[:-1])
        self.up_blocks = nn.ModuleList(
            [
                UpDecoderBlock2D(cin, cout, layers + 1, groups, upsample=i < len(rev) - 1)
                for i, (cin, cout) in enumerate(zip(cins, rev, strict=True))
            ]
        )
        self.conv_norm_out = _norm(channels[0], groups)
        self.conv_out = nn.Conv2d(channels[0], 3, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(x)
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class SpatialKL(nn.Module):
    """Holds `encoder` and `decoder` under the diffusers AutoencoderKL names."""

    def __init__(self, channels: tuple[int, ...], layers: int, groups: int, latent_channels: int):
        super().__init__()
        self.encoder = SpatialEncoder(channels, layers, groups, latent_channels)
        self.decoder = SpatialDecoder(channels, layers, groups, latent_channels)


class SpatialVAE(nn.Module):
    """Per-frame 2D autoencoder; parameters live under `module.*` as in the release."""

    def __init__(
        self,
        channels: tuple[int, ...],
        layers: int,
        groups: int,
        latent_channels: int,
        scaling_factor: float,
        frame_batch: int,
    ):
        super().__init__()
        self.module = SpatialKL(channels, layers, groups, latent_channels)
        self.scaling_factor = scaling_factor
        self.frame_batch = frame_batch
        self.downsample = 2 ** (len(channels) - 1)

    def _per_frame(self, fn, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        frames = x.transpose(1, 2).flatten(0, 1)  # [B, C, F, H, W] -> [B*F, C, H, W]
        out = torch.cat([fn(chunk) for chunk in frames.split(self.frame_batch)])
        return out.unflatten(0, (b, -1)).transpose(1, 2)  # [B*F, C', H', W'] -> [B, C', F, H', W']

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B, 3, F, H, W] -> [B, C_last, F, H/8, W/8], scaled by `scaling_factor`."""
        return self._per_frame(lambda x: self.module.encoder(x) * self.scaling_factor, pixels)

    def decode(self, feats: torch.Tensor) -> torch.Tensor:
        """[B, C_last, F, h, w] -> [B, 3, F, 8h, 8w]."""
        return self._per_frame(lambda x: self.module.decoder(x / self.scaling_factor), feats)
