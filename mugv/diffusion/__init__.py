"""Rectified flow training objective and Euler sampler (pure torch; no Megatron)."""

from mugv.diffusion.rectified_flow import (
    add_noise,
    flow_loss,
    latent_ratio,
    sample_timesteps,
    sampling_schedule,
    shift_ratio,
    shift_sigma,
    velocity_target,
)
from mugv.diffusion.sampler import (
    RELEASE_NEGATIVE_PROMPT,
    RELEASE_PROMPT_SUFFIX,
    SamplerConfig,
    euler_sample,
    model_dtype,
    schedule_ratio,
)

__all__ = [
    "RELEASE_NEGATIVE_PROMPT",
    "RELEASE_PROMPT_SUFFIX",
    "SamplerConfig",
    "add_noise",
    "euler_sample",
    "flow_loss",
    "latent_ratio",
    "model_dtype",
    "sample_timesteps",
    "schedule_ratio",
    "sampling_schedule",
    "shift_ratio",
    "shift_sigma",
    "velocity_target",
]
