"""The temporal half of the MUG-V VAE: a 3D-conv autoencoder over 2D-VAE features.

8 feature frames -> 1 latent frame (three stride-2 temporal convs, no spatial resampling).
Parameter names follow the release `temporal_vae.*` layout (SPEC section 5). All 3D convs
zero-pad time symmetrically (total kernel-stride, the extra frame at the back) and space by
kernel//2, so they see only the frames of the chunk they are given.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PaddedConv3d(nn.Module):
    """Conv3d (held as `.conv`) with explicit zero padding; stride only along time."""

    def __init__(self, cin: int, cout: int, kernel: int, time_stride: int = 1, bias: bool = True):
        super().__init__()
        time_pad = kernel - time_stride  # kernel 3: stride 1 -> (1, 1), stride 2 -> (0, 1)
        space_pad = kernel // 2
        self.pad = (space_pad, space_pad, space_pad, space_pad, time_pad // 2, time_pad - time_pad // 2)
        self.conv = nn.Conv3d(cin, cout, kernel, stride=(time_stride, 1, 1), bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, self.pad))


class ResBlock3d(nn.Module):
    """GroupNorm-SiLU-conv twice (no biases) plus a 1x1x1-projected skip when widths differ.

    With `time_upsample`, the input is first repeated 2x along time (nearest neighbour).
    """

    def __init__(self, cin: int, cout: int, groups: int, time_upsample: bool = False):
        super().__init__()
        self.time_upsample = time_upsample
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = PaddedConv3d(cin, cout, 3, bias=False)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.conv2 = PaddedConv3d(cout, cout, 3, bias=False)
        self.conv3 = PaddedConv3d(cin, cout, 1, bias=False) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.time_upsample:
            x = x.repeat_interleave(2, dim=2)  # [B, C, T, H, W] -> [B, C, 2T, H, W]
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        skip = x if self.conv3 is None else self.conv3(x)
        return h + skip


def _stack(cin: int, cout: int, num: int, groups: int) -> nn.ModuleList:
    return nn.ModuleList([ResBlock3d(cin if i == 0 else cout, cout, groups) for i in range(num)])


def _run(blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
    for block in blocks:
        x = block(x)
    return x


class TemporalEncoder(nn.Module):
    """[N, C_in, 8, h, w] -> [N, 2*latent, 1, h, w]."""

    def __init__(self, cin: int, cout: int, filters: int, num_res: int, mults: tuple[int, ...], groups: int):
        super().__init__()
        widths = [filters * m for m in mults]
        self.conv_in = PaddedConv3d(cin, filters, 3, bias=False)
        prev = [filters, *widths[:-1]]
        self.block_res_blocks = nn.ModuleList(
            [_stack(p, w, num_res, groups) for p, w in zip(prev, widths, strict=True)]
        )
        self.conv_blocks = nn.ModuleList([PaddedConv3d(w, w, 3, time_stride=2) for w in widths[:-1]])
        self.res_blocks = _stack(widths[-1], widths[-1], num_res, groups)
        self.norm1 = nn.GroupNorm(groups, widths[-1])
        self.conv2 = PaddedConv3d(widths[-1], cout, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for i, blocks in enumerate(self.block_res_blocks):
            x = _run(blocks, x)
            if i < len(self.conv_blocks):
                x = self.conv_blocks[i](x)  # halves T
        x = _run(self.res_blocks, x)
        return self.conv2(F.silu(self.norm1(x)))


class TemporalDecoder(nn.Module):
    """[N, latent, T, h, w] -> [N, C_out, 8T, h, w].

    Time doubles in `upsample_block`, then in `conv_blocks[2]` and `conv_blocks[1]`
    (depth-to-time: 2C channels -> C channels, 2x frames); `conv_blocks[0]` is an identity.
    """

    def __init__(self, cin: int, cout: int, filters: int, num_res: int, mults: tuple[int, ...], groups: int):
        super().__init__()
        widths = [filters * m for m in mults]
        self.conv1 = PaddedConv3d(cin, widths[-1], 3)
        self.res_blocks = _stack(widths[-1], widths[-1], num_res, groups)
        self.upsample_block = ResBlock3d(widths[-1], widths[-1], groups, time_upsample=True)
        prev = [*widths[1:], widths[-1]]  # level i receives the width of level i+1
        self.block_res_blocks = nn.ModuleList(
            [_stack(p, w, num_res, groups) for p, w in zip(prev, widths, strict=True)]
        )
        convs: list[nn.Module] = [nn.Identity()]
        convs += [PaddedConv3d(w, 2 * w, 3) for w in widths[2:]]
        self.conv_blocks = nn.ModuleList(convs)
        self.norm1 = nn.GroupNorm(groups, widths[0])
        self.conv_out = PaddedConv3d(widths[0], cout, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        x = _run(self.res_blocks, x)
        x = self.upsample_block(x)
        for i in reversed(range(len(self.block_res_blocks))):
            x = _run(self.block_res_blocks[i], x)
            if i > 0 and not isinstance(self.conv_blocks[i - 1], nn.Identity):
                x = self.conv_blocks[i - 1](x)
                b, c2, t, h, w = x.shape
                # [B, (C 2), T, h, w] -> [B, C, (T 2), h, w]: channel c*2+s becomes frame 2t+s
                x = (
                    x.reshape(b, c2 // 2, 2, t, h, w)
                    .permute(0, 1, 3, 2, 4, 5)
                    .reshape(b, c2 // 2, 2 * t, h, w)
                )
        return self.conv_out(F.silu(self.norm1(x)))


class TemporalVAE(nn.Module):
    """Encoder/decoder pair with 1x1x1 `quant_conv` / `post_quant_conv`, release names."""

    def __init__(
        self,
        channels: int,
        latent_channels: int,
        filters: int,
        num_res: int,
        mults: tuple[int, ...],
        groups: int,
    ):
        super().__init__()
        if len(mults) != 4:
            raise ValueError(f"temporal channel multipliers must have 4 entries (8x in time), got {mults}")
        self.encoder = TemporalEncoder(channels, 2 * latent_channels, filters, num_res, mults, groups)
        self.quant_conv = PaddedConv3d(2 * latent_channels, 2 * latent_channels, 1)
        self.post_quant_conv = PaddedConv3d(latent_channels, latent_channels, 1)
        self.decoder = TemporalDecoder(latent_channels, channels, filters, num_res, mults, groups)

    def moments(self, groups: torch.Tensor) -> torch.Tensor:
        """[N, C, 8, h, w] feature groups -> [N, 2*latent, 1, h, w] (mean, logvar)."""
        return self.quant_conv(self.encoder(groups))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """[B, latent, T, h, w] -> [B, C, 8T, h, w]; the T latent frames are decoded jointly."""
        return self.decoder(self.post_quant_conv(z))
