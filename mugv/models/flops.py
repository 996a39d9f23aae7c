"""Model FLOPs of MUGDiT and model-FLOPs utilisation (MFU).

Counts the matrix-multiply FLOPs of the plain MUGDiT (:mod:`mugv.models.mugdit`), one
multiply-add = 2 FLOPs, the same quantity torch.utils.flop_counter counts: every Linear, the
patchify Conv3d and both attention products (Q K^T and A V). Normalisations, activations,
softmax, RoPE and modulation are elementwise and not counted (they are well under 1 % at real
sizes). Per sample:

- patchify: 2 * T*S * (24*4) * C, with S = ceil(H/2) * ceil(W/2) (padded latent grid);
- timestep embedder run twice (t and t = 0 for conditioning frames) and fps embedder once:
  3 * 2 * (256*C + C^2); adaLN-single ``t_block`` twice (for e and e0): 2 * 2 * C * 6C;
  these are per sample, not per token;
- caption embedder over the text tokens: 2 * Lt * (Ct*C + C^2);
- per block, with N = T*S + 2 tokens: self-attention 2*N*C*3C (qkv) + 4*N^2*C (scores and
  values over all heads) + 2*N*C^2 (proj); cross-attention 2*N*C^2 (q) + 2*Lt*C*2C (kv) +
  4*N*Lt*C + 2*N*C^2 (proj); MLP 2 * 2*N*C*rC (r = mlp_ratio);
- final layer over all N tokens (start/end are dropped afterwards): 2*N*C*(4*48).

`text_len` (Lt) is the number of key tokens cross-attention actually processes: the padded
length for a dense masked kernel, the real caption length for a variable-length kernel.
Training counts forward + backward as 3x forward (no activation recompute counted). A packed
micro-batch (several samples in one sequence, attention per sample) costs the sum of its
samples' FLOPs.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from functools import cache

from mugv.models.mugdit import PATCH, MUGDiTConfig

# Peak dense (no sparsity) bf16 tensor-core FLOP/s, from the vendors' data sheets.
PEAK_BF16_FLOPS: dict[str, float] = {
    "B200": 2250e12,
    "H200": 989e12,
    "GH200": 989e12,
    "H100 SXM": 989e12,
    "H100 NVL": 835e12,
    "H100 PCIe": 756e12,
    "H800": 989e12,
    "H20": 148e12,
    "A100": 312e12,
    "A800": 312e12,
    "L40S": 362e12,
    "L4": 121e12,
}

# (pattern on torch.cuda.get_device_name(), table key); first match wins, most specific first.
_DEVICE_PATTERNS: list[tuple[str, str]] = [
    (r"\bB200\b", "B200"),
    (r"\bGH200\b", "GH200"),
    (r"\bH200\b", "H200"),
    (r"\bH100\b.*\bNVL\b", "H100 NVL"),
    (r"\bH100\b.*\bPCIe\b", "H100 PCIe"),
    (r"\bH100\b", "H100 SXM"),  # "NVIDIA H100 80GB HBM3" is the SXM part
    (r"\bH800\b", "H800"),
    (r"\bH20\b", "H20"),
    (r"\bA100\b", "A100"),
    (r"\bA800\b", "A800"),
    (r"\bL40S\b", "L40S"),
    (r"\bL4\b", "L4"),
]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def mugdit_flops_per_sample(
    config: MUGDiTConfig, T: int, H: int, W: int, text_len: int, training: bool = True
) -> float:
    """Model FLOPs for one sample of latent size [T, H, W] with `text_len` text tokens:
    one forward, or forward + backward (3x) when `training`."""
    for name, value in (("T", T), ("H", H), ("W", W), ("text_len", text_len)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"mugdit_flops_per_sample: {name} must be a positive int, got {value!r}")
    C, L = config.hidden_size, text_len
    S = _ceil_div(H, PATCH[1]) * _ceil_div(W, PATCH[2])
    N = T * S + 2
    patch_in = PATCH[0] * PATCH[1] * PATCH[2] * config.in_channels
    freq = config.frequency_embedding_size

    embed = 2 * T * S * patch_in * C  # patchify conv
    embed += 3 * 2 * (freq * C + C * C)  # t_embedder(t), t_embedder(0), fps_embedder
    embed += 2 * 2 * C * 6 * C  # t_block on e and e0
    embed += 2 * L * (config.caption_channels * C + C * C)  # caption embedder
    final = 2 * N * C * config.patch_out
    forward = embed + config.depth * block_flops_per_sample(config, T, H, W, text_len)["forward"] + final
    return float(3 * forward if training else forward)


def sample_cost(config: MUGDiTConfig, text_len: int) -> Callable[[int, int, int], float]:
    """(T, H, W) -> training FLOPs of one sample with `text_len` text tokens: the cost the packed
    sampler balances over data-parallel ranks (a packed micro-batch costs the sum over its samples:
    attention is per sample, sum of N_i^2, not (sum of N_i)^2)."""
    text_len = text_len or 300

    @cache
    def cost(T: int, H: int, W: int) -> float:
        return mugdit_flops_per_sample(config, T, H, W, text_len)

    return cost


def block_flops_per_sample(config: MUGDiTConfig, T: int, H: int, W: int, text_len: int) -> dict[str, float]:
    """One block's forward FLOPs for one sample: {"forward": all, "attention_core": the attention
    products (Q K^T and A V) of self- and cross-attention}."""
    C, L, r = config.hidden_size, text_len, config.mlp_ratio
    N = T * _ceil_div(H, PATCH[1]) * _ceil_div(W, PATCH[2]) + 2
    core = 4 * N * N * C + 4 * N * L * C
    self_attn = 2 * N * C * 3 * C + 2 * N * C * C
    cross_attn = 2 * N * C * C + 2 * L * C * 2 * C + 2 * N * C * C
    mlp = 2 * 2 * N * C * r * C
    return {"forward": float(core + self_attn + cross_attn + mlp), "attention_core": float(core)}


def attention_kernel_head_dim(head_dim: int) -> int:
    """The head dim fused attention kernels (flash / cuDNN) compute at: rounded up to a multiple
    of 32 (72 runs as 96)."""
    return -(-head_dim // 32) * 32


def peak_bf16_flops(device_name: str | None = None) -> float | None:
    """Peak dense bf16 FLOP/s of a GPU, looked up by its torch.cuda.get_device_name() string
    (the current device when None). None when unknown or when there is no GPU."""
    if device_name is None:
        import torch

        if not torch.cuda.is_available():
            return None
        device_name = torch.cuda.get_device_name()
    for pattern, key in _DEVICE_PATTERNS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return PEAK_BF16_FLOPS[key]
    return None


def mfu(flops_per_second: float, peak: float) -> float:
    """Model-FLOPs utilisation: achieved model FLOP/s per device divided by the device peak."""
    if peak <= 0:
        raise ValueError(f"mfu: peak must be positive, got {peak}")
    return flops_per_second / peak
