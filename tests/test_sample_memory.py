"""The `mugv sample --dry-run` memory estimate: its parameter counts are the models' real ones,
its DiT activation term matches the measured peak of a forward on CPU, and the 10B at 720p /
105 frames is planned under 80 GB."""

import json

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from mugv.cli.main import main as cli
from mugv.models.memory import dit_activation_bytes
from mugv.models.mugdit import MUGDiT, MUGDiTConfig
from mugv.sample_memory import GIB, count_parameters
from mugv.text import make_tiny_t5
from tests.conftest import tiny_model


def measured_peak_bytes(fn) -> int:
    """Peak of the CPU allocator's live bytes (profiler memory events) while fn() runs."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for e in sorted(prof.profiler.kineto_results.events(), key=lambda e: e.start_ns()):
        if e.name() == "[memory]":
            live += e.nbytes()
            peak = max(peak, live)
    return peak


def test_parameter_count_is_the_models():
    assert count_parameters(lambda: MUGDiT(MUGDiTConfig())) == 10_830_321_984  # SPEC 1, exactly
    m = tiny_model()
    assert count_parameters(lambda: MUGDiT(m.config)) == sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize("dtype, hidden, heads, band", [
    (torch.bfloat16, 96, 4, 0.05), (torch.bfloat16, 144, 2, 0.05), (torch.float32, 96, 4, 0.15),
])  # fmt: skip
def test_dit_activation_estimate_matches_the_measured_peak(dtype, hidden, heads, band):
    model = tiny_model(hidden_size=hidden, num_heads=heads).to(dtype).eval()
    B, shape = 2, (3, 16, 24)
    x, t = torch.randn(B, 24, *shape), torch.full((B,), 500.0)
    y, mask = torch.randn(B, 1, 8, model.config.caption_channels), torch.ones(B, 8, dtype=torch.bool)
    with torch.no_grad():
        measured = measured_peak_bytes(lambda: model(x, t, y, mask))
    estimate = dit_activation_bytes(model.config, shape, B, dtype)
    assert abs(estimate / measured - 1) < band, (estimate, measured)
    # and it scales: twice the frames, about twice the bytes
    assert dit_activation_bytes(model.config, (6, 16, 24), B, dtype) == pytest.approx(2 * estimate, rel=0.01)


def test_dry_run_plans_the_10b_at_720p_under_80gb(tmp_path, capsys):
    t5 = make_tiny_t5(tmp_path / "t5", d_model=32, num_heads=2)
    (tmp_path / "vae.json").write_text(json.dumps({"kind": "video_vae"}))  # the release VAE config
    args = ["sample", "--dry-run", "--config", "mugdit_10b", "--t5", t5, "--vae", str(tmp_path / "vae.json"),
            "--prompt", "x", "--frames", "105", "--height", "720", "--width", "1280", "--dtype", "bfloat16"]  # fmt: skip
    assert cli(args) == 0
    out = capsys.readouterr().out
    assert "DiT 10,830,321,984" in out
    peak = float(out.split("estimated peak: ")[1].split(" GiB")[0])
    weights = 10_830_321_984 * 2 / GIB
    assert weights < peak < 80e9 / GIB, out
