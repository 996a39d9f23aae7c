"""Shared test fixtures: tiny MUGDiTs with every parameter randomised, and mixed batches."""

import os

import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")

from mugv.models import MUGDiT, MUGDiTConfig  # noqa: E402

TINY = dict(hidden_size=72, depth=2, num_heads=2, caption_channels=32)
# a video VAE of the release architecture with small widths (tests only)
SMALL_VAE = dict(
    spatial_channels=(16, 16, 32, 32),
    spatial_layers=1,
    spatial_groups=8,
    temporal_filters=16,
    temporal_res_blocks=1,
    temporal_groups=8,
)


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Fill every parameter with random values (norm weights too: ones would hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            base = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            p.copy_(base + torch.randn(p.shape, generator=g) * 0.2)
    return model


def tiny_model(seed: int = 0, **overrides) -> MUGDiT:
    torch.manual_seed(seed)
    return randomize_(MUGDiT(MUGDiTConfig(**{**TINY, **overrides})), seed)


def mixed_batch(cfg: MUGDiTConfig, B=3, T=3, H=5, W=6, L=7, seed=1):
    """A batch with an I2V sample, per-sample text lengths, odd H, varied fps and frame indices."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, cfg.in_channels, T, H, W, generator=g)
    t = torch.rand(B, generator=g) * 1000
    y = torch.randn(B, 1, L, cfg.caption_channels, generator=g)
    mask = torch.ones(B, L, dtype=torch.bool)
    for b in range(B):
        mask[b, max(1, L - 2 * b) :] = b == 0  # lengths L, L-2, L-4
    x_mask = torch.ones(B, T, dtype=torch.bool)
    if B > 1 and T > 1:
        x_mask[1, 0] = False  # sample 1 is image-to-video
    fps = torch.tensor([30.0, 24.0, 8.0][:B] + [30.0] * max(0, B - 3))
    frame_indices = torch.arange(T + 2).repeat(B, 1)
    frame_indices[-1] += 5
    return dict(x=x, timestep=t, y=y, mask=mask, x_mask=x_mask, fps=fps, frame_indices=frame_indices)


@pytest.fixture
def tiny():
    return tiny_model()


def packed_microbatch(cfg: MUGDiTConfig, groups, seed=1):
    """A packed micro-batch: groups [(B, T, H, W, L), ...] of same-shape samples, each a
    mixed_batch; returns (model inputs as lists over the groups, targets as a list)."""
    parts = [mixed_batch(cfg, B=B, T=T, H=H, W=W, L=L, seed=seed + i) for i, (B, T, H, W, L) in enumerate(groups)]
    g = torch.Generator().manual_seed(seed + 100)
    targets = [torch.randn(p["x"].shape[0], 24, *p["x"].shape[2:], generator=g) for p in parts]
    return {k: [p[k] for p in parts] for k in parts[0]}, targets
