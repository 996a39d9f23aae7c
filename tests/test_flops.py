"""mugdit_flops_per_sample against torch's FlopCounterMode on the plain MUGDiT.

FlopCounterMode counts matmul-like ops. On CPU, scaled_dot_product_attention dispatches to a
fused CPU kernel that FlopCounterMode does not know (it counts 0 for it), so the model is run
under the MATH SDPA backend, which computes the same attention as bmm ops that it counts.
"""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mugv.models import MUGDiT, MUGDiTConfig
from mugv.models.flops import PEAK_BF16_FLOPS, mfu, mugdit_flops_per_sample, peak_bf16_flops

CFG = dict(hidden_size=72, depth=2, num_heads=2, caption_channels=32)
SHAPES = [(2, 8, 8, 10), (3, 5, 7, 17), (1, 12, 10, 4)]  # T, H, W (latent), text length


def counted_flops(model: MUGDiT, B: int, T: int, H: int, W: int, L: int, backward: bool) -> int:
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, cfg.in_channels, T, H, W, generator=g, requires_grad=backward)
    y = torch.randn(B, 1, L, cfg.caption_channels, generator=g, requires_grad=backward)
    t = torch.rand(B, generator=g) * 1000
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        out = model(x, t, y)
        if backward:
            out.sum().backward()
    return counter.get_total_flops()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return MUGDiT(MUGDiTConfig(**CFG))


@pytest.mark.parametrize("T,H,W,L", SHAPES)
def test_forward_flops_match_flop_counter(model, T, H, W, L):
    B = 2
    want = counted_flops(model, B, T, H, W, L, backward=False)
    got = B * mugdit_flops_per_sample(model.config, T, H, W, L, training=False)
    assert got == pytest.approx(want, rel=1e-9)  # the formula counts exactly what the counter counts


@pytest.mark.parametrize("T,H,W,L", SHAPES)
def test_training_flops_match_flop_counter(model, T, H, W, L):
    """Inputs require grad so that the first layers' input gradients are computed (and counted),
    as for every layer inside a real network. The 3x rule then overcounts only the input
    gradient of the timestep/fps embedders' first Linear (its sinusoid input is a constant):
    about 0.3 % here, far less at real sizes."""
    B = 2
    want = counted_flops(model, B, T, H, W, L, backward=True)
    got = B * mugdit_flops_per_sample(model.config, T, H, W, L, training=True)
    assert want < got < want * 1.01


def test_flops_scale_with_sequence_and_text():
    cfg = MUGDiTConfig.from_preset("mugdit_10b")
    base = mugdit_flops_per_sample(cfg, 14, 90, 160, 300, training=False)
    assert mugdit_flops_per_sample(cfg, 14, 90, 160, 300) == 3 * base
    # odd latent sizes pad to the same token grid as the next even size
    assert mugdit_flops_per_sample(cfg, 14, 89, 159, 300, training=False) == base
    # 5 s 720p, 50,402 tokens: per token and block, self-attention scores cost 4*N*C against
    # 2*14*C^2 for the linears, so attention is 4N / (4N + 28C) ~ 67 % of the model
    N, C, L = 14 * 45 * 80 + 2, cfg.hidden_size, cfg.depth
    attention = L * 4 * N * N * C
    assert attention / base == pytest.approx(4 * N / (4 * N + 28 * C), abs=0.01)
    assert mugdit_flops_per_sample(cfg, 14, 90, 160, 100, training=False) < base
    with pytest.raises(ValueError, match="text_len"):
        mugdit_flops_per_sample(cfg, 14, 90, 160, 0)


@pytest.mark.parametrize(
    "name,key",
    [
        ("NVIDIA H100 80GB HBM3", "H100 SXM"),
        ("NVIDIA H100 PCIe", "H100 PCIe"),
        ("NVIDIA H100 NVL", "H100 NVL"),
        ("NVIDIA H200", "H200"),
        ("NVIDIA GH200 480GB", "GH200"),
        ("NVIDIA H20", "H20"),
        ("NVIDIA A100-SXM4-80GB", "A100"),
        ("NVIDIA L4", "L4"),
        ("NVIDIA L40S", "L40S"),
    ],
)
def test_peak_lookup_by_device_name(name, key):
    assert peak_bf16_flops(name) == PEAK_BF16_FLOPS[key]


def test_peak_unknown_and_mfu():
    assert peak_bf16_flops("Some Future Accelerator") is None
    assert PEAK_BF16_FLOPS["H100 SXM"] == 989e12 and PEAK_BF16_FLOPS["A100"] == 312e12
    assert mfu(494.5e12, 989e12) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        mfu(1.0, 0.0)
