"""Euler sampling of the rectified flow with classifier-free guidance and I2V conditioning."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from mugv.diffusion.rectified_flow import LATENT_CHANNELS, dims_ratio, sampling_schedule

# model(x, timestep, y, mask, x_mask, fps, frame_indices) -> [B, >=24, T, H, W]
VelocityModel = Callable[..., torch.Tensor]


@dataclass
class SamplerConfig:
    num_steps: int = 25
    guidance_scale: float = 4.0
    fps: float = 30.0
    shift_ratio: float = 0.0  # 0: the resolution/duration shift of the latent's size (SPEC); > 0: this ratio

    def validate(self) -> None:
        if self.num_steps < 1:
            raise ValueError(f"sampler.num_steps must be >= 1, got {self.num_steps}")


def _pad_text(y: torch.Tensor, mask: torch.Tensor, length: int):
    """Right-pad text features [B, 1, L, C] and mask [B, L] to `length` tokens."""
    pad = length - y.shape[2]
    if pad == 0:
        return y, mask
    y = torch.nn.functional.pad(y, (0, 0, 0, pad))
    return y, torch.nn.functional.pad(mask, (0, pad), value=False)


@torch.no_grad()
def euler_sample(
    model: VelocityModel,
    noise: torch.Tensor,
    y: torch.Tensor,
    mask: torch.Tensor,
    y_neg: torch.Tensor | None = None,
    mask_neg: torch.Tensor | None = None,
    cfg: SamplerConfig | None = None,
    cond_frame: torch.Tensor | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Denoise `noise` [B, 24, T, H, W] into latents.

    y [B, 1, L, Ct] / mask [B, L]: prompt encodings; y_neg / mask_neg: negative-prompt encodings
    ([1 or B, 1, L', Ct]) for the unconditional branch (no CFG when None or guidance_scale == 1).
    cond_frame [B, 24, 1, H, W]: I2V reference latent; frame 0 is held at it (x_mask False) and
    reset after every step, so it comes out bit-identical.
    """
    cfg = cfg or SamplerConfig()
    cfg.validate()
    B, _, T, H, W = noise.shape
    device = noise.device
    z = noise.clone()
    x_mask = torch.ones(B, T, dtype=torch.bool, device=device)
    if cond_frame is not None:
        x_mask[:, 0] = False
        z[:, :, :1] = cond_frame
    use_cfg = y_neg is not None and cfg.guidance_scale != 1.0
    if use_cfg:
        y_neg = y_neg.expand(B, *y_neg.shape[1:])
        mask_neg = mask_neg.expand(B, -1)
        L = max(y.shape[2], y_neg.shape[2])
        (yc, mc), (yn, mn) = _pad_text(y, mask, L), _pad_text(y_neg, mask_neg, L)
        y_all, mask_all = torch.cat([yc, yn]), torch.cat([mc, mn])
    fps = torch.full((B,), cfg.fps, device=device)
    frame_indices = torch.arange(T + 2, device=device).expand(B, -1)
    ts = sampling_schedule(cfg.num_steps, cfg.shift_ratio or dims_ratio(noise.shape))
    for i in range(cfg.num_steps):
        t = torch.full((B,), ts[i], device=device)
        if use_cfg:
            v = model(
                torch.cat([z, z]), torch.cat([t, t]), y_all, mask_all,
                torch.cat([x_mask, x_mask]), torch.cat([fps, fps]), torch.cat([frame_indices, frame_indices]),
            )[:, :LATENT_CHANNELS].float()
            v_c, v_u = v.chunk(2)
            v = v_u + cfg.guidance_scale * (v_c - v_u)
        else:
            v = model(z, t, y, mask, x_mask, fps, frame_indices)[:, :LATENT_CHANNELS].float()
        z = (z.float() + v * (ts[i] - ts[i + 1]) / 1000.0).to(noise.dtype)
        if cond_frame is not None:
            z[:, :, :1] = cond_frame
        if progress is not None:
            progress(i + 1, cfg.num_steps)
    return z
