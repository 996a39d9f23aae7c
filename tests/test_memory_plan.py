"""The memory plan against measurement: bytes one Megatron MUGDiT block keeps for backward
(saved-tensor hooks over its forward; storages de-duplicated, parameters excluded), for each
activation dtype and recompute mode, within 10% of mugv.training.plan.block_bytes; every mode
gives the same gradients."""

import pytest
import torch

from tests.dist_harness import run_distributed

MODES = (None, "selective", "full")
SHAPE = dict(T=4, Hp=12, Wp=12, B=2, L=(20, 13))  # 578 tokens per sample, two caption lengths
DIT = dict(hidden_size=288, depth=1, num_heads=4, caption_channels=64)  # D = 72 as in the presets


def measure_worker(rank, world):
    from megatron.core.transformer.spec_utils import build_module

    from mugv.models import MUGDiTConfig
    from mugv.models.layout import TokenLayout
    from mugv.models.megatron import get_layer_spec, megatron_config
    from mugv.models.megatron.layer import DiTContext
    from mugv.models.megatron.model import run_layers
    from mugv.parallel.runtime import init_distributed
    from mugv.training.plan import block_bytes

    init_distributed()
    dit = MUGDiTConfig(**DIT)
    T, Hp, Wp, B, lens = SHAPE["T"], SHAPE["Hp"], SHAPE["Wp"], SHAPE["B"], list(SHAPE["L"])
    lay = TokenLayout(T, Hp, Wp)
    n, C, D = lay.N, dit.hidden_size, dit.head_dim
    out, weights = {}, None
    for dtype in (torch.float32, torch.bfloat16):
        g = torch.Generator().manual_seed(0)
        h0 = torch.randn(n, B, C, generator=g)
        fm0 = torch.randn(T + 1, B, 6 * C, generator=g) * 0.1
        text0 = torch.randn(sum(lens), 1, C, generator=g)
        rope = torch.rand(n, B, 1, D // 2, generator=g) * 6
        for mode in MODES:
            cfg = megatron_config(dit, recompute_granularity=mode, bf16=dtype == torch.bfloat16,
                                  params_dtype=dtype, pipeline_dtype=dtype)
            layer = build_module(get_layer_spec("local"), config=cfg, layer_number=1)
            if weights is None:  # every layer gets the same weights
                weights = {k: v.clone() for k, v in layer.state_dict().items() if v is not None}
            layer.load_state_dict(weights, strict=False)
            layer = layer.to(dtype)
            h, fm, text = (t.to(dtype).requires_grad_() for t in (h0, fm0, text0))
            ctx = DiTContext(lay, n, rope, fm, text, lens)
            params = {p.untyped_storage().data_ptr() for p in layer.parameters()}
            kept: dict[int, int] = {}

            def pack(t, params=params, kept=kept):
                st = t.untyped_storage()
                if st.data_ptr() not in params:
                    kept[st.data_ptr()] = st.nbytes()
                return t

            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                y = run_layers(torch.nn.ModuleList([layer]), h, ctx)
            y.float().square().mean().backward()
            plan = block_bytes(dit, mode, dtype.itemsize, n * B, sum(lens), (T + 1) * B)
            grads = [t.grad.float() for t in (h, fm, text)] + [p.grad.float() for p in layer.parameters()]
            out[str(dtype), mode] = (sum(kept.values()), plan, grads)
    return out


@pytest.fixture(scope="module")
def measured():
    return run_distributed(measure_worker, 1, timeout=240)[0]


@pytest.mark.parametrize("dtype", ["torch.float32", "torch.bfloat16"])
@pytest.mark.parametrize("mode", MODES)
def test_plan_within_10_percent_of_measured(measured, dtype, mode):
    got, plan, _ = measured[dtype, mode]
    assert abs(plan - got) <= 0.10 * got, f"{mode} {dtype}: measured {got} bytes, plan {plan:.0f}"


def test_recompute_saves_memory_and_keeps_gradients(measured):
    for dtype in ("torch.float32", "torch.bfloat16"):
        none, sel, full = (measured[dtype, m][0] for m in MODES)
        assert sel < 0.65 * none and full < 0.15 * sel, (none, sel, full)
        ref = measured[dtype, None][2]
        # fp32: the same arithmetic; bf16: gradient sums may round in another order
        tol = 1e-5 if dtype == "torch.float32" else 2e-2
        for mode in ("selective", "full"):
            for a, b in zip(measured[dtype, mode][2], ref, strict=True):
                err = float((a - b).abs().max() / b.abs().max())
                assert err <= tol, (dtype, mode, err)
