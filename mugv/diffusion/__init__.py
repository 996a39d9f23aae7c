"""Rectified flow training objective and Euler sampler (pure torch; no Megatron)."""

from mugv.diffusion.rectified_flow import (
    add_noise,
    dims_ratio,
    flow_loss,
    sample_timesteps,
    sampling_schedule,
    shift_ratio,
    shift_sigma,
    velocity_target,
)
from mugv.diffusion.sampler import SamplerConfig, euler_sample

__all__ = [
    "SamplerConfig",
    "add_noise",
    "dims_ratio",
    "euler_sample",
    "flow_loss",
    "sample_timesteps",
    "sampling_schedule",
    "shift_ratio",
    "shift_sigma",
    "velocity_target",
]
