"""Rectified flow as MUG-V trains it (SPEC section 4). Pure torch.

Timesteps live on a 0..1000 scale (1000 = pure noise); s = t / 1000 is the noise fraction:
x_t = (1 - s) x0 + s eps, and the model predicts the velocity v = x0 - eps.
"""

from __future__ import annotations

import torch

NUM_TIMESTEPS = 1000.0
LATENT_CHANNELS = 24


def shift_ratio(height_px, width_px, latent_frames, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """r = sqrt(H_px * W_px / 512^2) * sqrt(T_latent) (T_latent = 1 for images); broadcasts; fp32.

    Every operation is done in `dtype`, as the release does with its size tensors made in the
    model dtype: under bf16, 720x1280 px with 14 latent frames gives r = 7.0, not 7.0156."""
    h, w, t = (torch.as_tensor(v).to(dtype) for v in (height_px, width_px, latent_frames))
    return (torch.sqrt(h * w / 512**2) * torch.sqrt(t)).float()


def shift_sigma(s: torch.Tensor, ratio) -> torch.Tensor:
    """The resolution/duration shift s' = r s / (1 + (r - 1) s)."""
    r = torch.as_tensor(ratio, dtype=s.dtype, device=s.device)
    return r * s / (1 + (r - 1) * s)


def sample_timesteps(ratio: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Training timesteps [B] in (0, 1000): s = sigmoid(n), n ~ N(0, 1), shifted by each sample's ratio."""
    ratio = torch.as_tensor(ratio, dtype=torch.float32)
    n = torch.randn(ratio.shape, generator=generator, device=ratio.device)
    return NUM_TIMESTEPS * shift_sigma(torch.sigmoid(n), ratio)


def _per_sample(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return (t.float() / NUM_TIMESTEPS).view(-1, *([1] * (ndim - 1)))


def add_noise(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, x_mask: torch.Tensor | None = None):
    """x_t = (1 - s) x0 + s eps with s = t/1000 per sample; x0, eps [B, C, T, H, W].

    Frames with x_mask False (clean conditioning frames) stay x0."""
    s = _per_sample(t, x0.dim())
    xt = (1 - s) * x0 + s * eps
    if x_mask is not None:
        xt = torch.where(x_mask[:, None, :, None, None], xt, x0)
    return xt


def velocity_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    return x0 - eps


def flow_loss(pred: torch.Tensor, target: torch.Tensor, x_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample loss [B]: squared error over the first C_target channels of pred, mean over
    (C, H, W), then mean over denoised frames (x_mask True). Average it for the batch loss."""
    c = target.shape[1]
    err = (pred[:, :c].float() - target.float()).pow(2).mean(dim=(1, 3, 4))  # [B, T]
    if x_mask is None:
        return err.mean(1)
    w = x_mask.to(err.dtype)
    count = w.sum(1)
    if bool((count == 0).any()):
        raise ValueError("a sample has no denoised frame (x_mask all False)")
    return (err * w).sum(1) / count


def sampling_schedule(num_steps: int, ratio: float) -> list[float]:
    """Euler timesteps (fp32 values), t_0 > ... > t_{N-1} > t_N = 0: t_i = 1000 (1 - i/N) shifted by
    ratio, in the release's fp32 order of operations (t / 1000, shift, * 1000)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    t = torch.tensor([(1.0 - i / num_steps) * NUM_TIMESTEPS for i in range(num_steps)], dtype=torch.float32)
    ts = shift_sigma(t / NUM_TIMESTEPS, float(ratio)) * NUM_TIMESTEPS
    return ts.tolist() + [0.0]


def latent_ratio(latent_shape, vae_stride: int = 8, dtype: torch.dtype = torch.float64) -> float:
    """Shift ratio of a latent [.., T, H, W] (pixel sizes = latent * vae_stride), computed in dtype."""
    T, H, W = latent_shape[-3:]
    return float(shift_ratio(H * vae_stride, W * vae_stride, T, dtype))
