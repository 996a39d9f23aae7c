"""Every parallel layout of the Megatron MUGDiT against the plain single-process MUGDiT with the
same release-layout weights and batch (I2V sample, per-sample text lengths, odd H):
outputs to 1e-5, every gradient and every parameter after one Adam step to 1e-4 (relative to
the tensor's largest magnitude)."""

import pytest
import torch
from conftest import TINY, mixed_batch, tiny_model

from tests.dist_harness import run_distributed
from tests.megatron_parity import Layout, parity_worker, reference, split_batch

LAYOUTS = {
    "tp2_sp": Layout(tp=2, sp=True),
    "tp2_nosp": Layout(tp=2, sp=False),
    "pp2": Layout(pp=2, microbatches=2),
    "vpp2x2": Layout(pp=2, vpp=2, microbatches=2),
    "cp2_a2a": Layout(cp=2, cp_attention="a2a"),
    "cp2_allgather": Layout(cp=2, cp_attention="allgather"),
    "dp2_distopt": Layout(dp=2),
    "dp2_distopt_overlap": Layout(dp=2, overlap=True),
    "tp2_pp2": Layout(tp=2, pp=2, sp=True, microbatches=2),
    "tp2_cp2": Layout(tp=2, cp=2, sp=True),
    "pp2_dp2": Layout(pp=2, dp=2, microbatches=2),
}


def rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


@pytest.fixture(scope="module")
def problem():
    model = tiny_model(seed=0, depth=4, num_heads=4, hidden_size=72)  # D = 18
    batch = mixed_batch(model.config, B=4, T=3, H=5, W=6, L=7)
    target = torch.randn(4, 24, 3, 5, 6, generator=torch.Generator().manual_seed(5))
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out, grads, params = reference(model, batch, target)
    kwargs = dict(TINY, depth=4, num_heads=4)
    return kwargs, sd, batch, target, out, grads, params


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_matches_single_process(name, problem):
    kwargs, sd, batch, target, ref_out, ref_grads, ref_params = problem
    layout = LAYOUTS[name]
    results = run_distributed(parity_worker, layout.world, layout, kwargs, sd, batch, target, timeout=240)
    grads, params = {}, {}
    for r in results:
        if r["outputs"] is not None:
            expect = split_batch({"o": ref_out}, layout.dp)[r["dp_rank"]]["o"]
            assert rel(r["outputs"], expect) <= 1e-5, f"output rel err {rel(r['outputs'], expect):.2e}"
        for k, g in r["grads"].items():
            grads.setdefault(k, []).append(g)
        for k, p in r["params"].items():
            params.setdefault(k, []).append(p)
    assert set(grads) == set(ref_grads), sorted(set(ref_grads) ^ set(grads))[:5]
    for k, ref in ref_grads.items():
        for g in grads[k]:
            assert rel(g, ref) <= 1e-4, f"grad {k}: rel err {rel(g, ref):.2e}"
    for k, ref in ref_params.items():
        for p in params[k]:
            assert rel(p, ref) <= 1e-4, f"param {k}: rel err {rel(p, ref):.2e}"
