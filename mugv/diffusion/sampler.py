"""Euler sampling of the rectified flow with classifier-free guidance and I2V conditioning.

`SamplerConfig` defaults reproduce the release's `infer_pipeline.py` (SPEC 4, "Release sampling
defaults"); each release behaviour has its own switch:
  negative_prompt   the release's fixed negative prompt for the unconditional CFG branch ("" = none)
  prompt_suffix     " aesthetic score: 6.0." appended to every prompt ("" = none)
  ratio_in_model_dtype  the shift ratio computed from sizes held in the model dtype (bf16: 7.0 at
                    720p / 14 latent frames instead of 7.0156); False = in float64
  reference_frame   I2V: the output's first frame is the reference image's own pixels (False: the
                    decoded latent frame 0)
  image_resample    how the reference image is resized: "bicubic" (Pillow, the release) or "bilinear"
The text-level switches are applied by mugv.sampling (encode_prompts / generate); euler_sample
uses the rest. Any velocity model works: model(x, t, y, mask, x_mask, fps, frame_indices).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from mugv.diffusion.rectified_flow import LATENT_CHANNELS, NUM_TIMESTEPS, latent_ratio, sampling_schedule

# model(x, timestep, y, mask, x_mask, fps, frame_indices) -> [B, >=24, T, H, W]
VelocityModel = Callable[..., torch.Tensor]

RELEASE_NEGATIVE_PROMPT = (
    "ugly, blurry, lowres, bad anatomy, bad hands, text, error, missing fingers, extra digit, "
    "fewer digits, cropped, worst quality, low quality, normal quality, jpeg artifacts, signature, "
    "watermark, username, blurry"
)
RELEASE_PROMPT_SUFFIX = " aesthetic score: 6.0."
RESAMPLE_MODES = ("bicubic", "bilinear")


@dataclass
class SamplerConfig:
    num_steps: int = 25
    guidance_scale: float = 4.0
    fps: float = 30.0
    shift_ratio: float = 0.0  # 0: the resolution/duration shift of the latent's size (SPEC); > 0: this ratio
    negative_prompt: str = RELEASE_NEGATIVE_PROMPT
    prompt_suffix: str = RELEASE_PROMPT_SUFFIX
    ratio_in_model_dtype: bool = True
    reference_frame: bool = True
    image_resample: str = "bicubic"

    def validate(self) -> None:
        if self.num_steps < 1:
            raise ValueError(f"sampler.num_steps must be >= 1, got {self.num_steps}")
        if self.shift_ratio < 0:
            raise ValueError(f"sampler.shift_ratio must be >= 0, got {self.shift_ratio}")
        if self.image_resample not in RESAMPLE_MODES:
            raise ValueError(f"sampler.image_resample must be one of {RESAMPLE_MODES}, got {self.image_resample!r}")


def model_dtype(model) -> torch.dtype:
    """The dtype of a module's first floating-point parameter; float32 for other callables."""
    params = model.parameters() if isinstance(model, torch.nn.Module) else ()
    return next((p.dtype for p in params if p.is_floating_point()), torch.float32)


def schedule_ratio(cfg: SamplerConfig, latent_shape, dtype: torch.dtype = torch.float32) -> float:
    """The shift ratio the sampler uses for a latent [.., T, H, W] with a model in `dtype`."""
    if cfg.shift_ratio > 0:
        return cfg.shift_ratio
    return latent_ratio(latent_shape, dtype=dtype if cfg.ratio_in_model_dtype else torch.float64)


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
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Denoise `noise` [B, 24, T, H, W] into latents (noise's dtype; integrated in fp32).

    y [B, 1, L, Ct] / mask [B, L]: prompt encodings; y_neg / mask_neg: negative-prompt encodings
    ([1 or B, 1, L', Ct]) for the unconditional branch (no CFG when None or guidance_scale == 1).
    cond_frame [B, 24, 1, H, W]: I2V reference latent; frame 0 is held at it (x_mask False) and
    reset after every step, so it comes out bit-identical. dtype: the model's compute dtype, for
    cfg.ratio_in_model_dtype (default: its parameters' dtype, float32 for a plain callable).
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
    ratio = schedule_ratio(cfg, noise.shape, dtype or model_dtype(model))
    ts = torch.tensor(sampling_schedule(cfg.num_steps, ratio), dtype=torch.float32, device=device)
    for i in range(cfg.num_steps):
        t = ts[i].repeat(B)
        if use_cfg:
            v = model(
                torch.cat([z, z]), torch.cat([t, t]), y_all, mask_all,
                torch.cat([x_mask, x_mask]), torch.cat([fps, fps]), torch.cat([frame_indices, frame_indices]),
            )[:, :LATENT_CHANNELS].float()
            v_c, v_u = v.chunk(2)
            v = v_u + cfg.guidance_scale * (v_c - v_u)
        else:
            v = model(z, t, y, mask, x_mask, fps, frame_indices)[:, :LATENT_CHANNELS].float()
        z = (z.float() + v * ((ts[i] - ts[i + 1]) / NUM_TIMESTEPS)).to(noise.dtype)
        if cond_frame is not None:
            z[:, :, :1] = cond_frame
        if progress is not None:
            progress(i + 1, cfg.num_steps)
    return z
