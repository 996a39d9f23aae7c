"""Flow-DPO: the loss's sign and scale, per-pair draws, and one training step at TP2+SP, PP2 and
VPP 2x2 (the reference run through the pipeline) and DP2 against a single process with the same
weights: the per-pair losses, every gradient and every parameter after one Adam step; the same
with LoRA (the reference is the policy with its adapters off) at TP2+SP and PP2; the frozen
reference's memory per rank."""

import copy
import dataclasses
import math

import pytest
import torch
from conftest import TINY, mixed_batch, tiny_model

from mugv.data.batch import LatentBatch
from mugv.diffusion import flow_loss
from mugv.training.dpo import FlowDPOObjective, flow_dpo_loss
from tests.dist_harness import run_distributed
from tests.megatron_parity import ADAM, Layout, build_parallel, to_release

BETA = 5.0
SEED = 3
LORA = dict(rank=4, alpha=0.16)


def rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def test_loss_sign_scale_and_ties():
    err = torch.tensor([1.0, 2.0, 3.0, 3.0])  # pairs (1.0 vs 2.0), (3.0 vs 3.0)
    ref = torch.tensor([1.5, 1.5, 3.0, 3.0])
    loss, z = flow_dpo_loss(err, ref, beta=4.0)
    # d(chosen) = -0.5, d(rejected) = 0.5: z = -4/2 * (-0.5 - 0.5) = 2 > 0, the chosen clip is preferred
    torch.testing.assert_close(z, torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(loss, torch.tensor([math.log1p(math.exp(-2.0)), math.log(2.0)]))
    # lowering the chosen clip's error lowers the loss
    lower, _ = flow_dpo_loss(err - torch.tensor([0.1, 0, 0, 0]), ref, beta=4.0)
    assert lower[0] < loss[0]


def paired(cfg, pairs: int, T=2, H=5, W=6, seed=1, stream_index=0) -> LatentBatch:
    """A paired micro-batch: 2k chosen, 2k + 1 rejected; a pair shares text, frames and fps."""
    b = mixed_batch(cfg, B=2 * pairs, T=T, H=H, W=W, L=7, seed=seed)
    share = lambda t: t[0::2].repeat_interleave(2, dim=0)  # noqa: E731
    x_mask = torch.ones(2 * pairs, T, dtype=torch.bool)
    x_mask[2:4, 0] = False  # pair 1 is image-to-video
    tasks = ["t2v" if bool(m[0]) else "i2v" for m in x_mask]
    return LatentBatch(
        latents=b["x"], y=share(b["y"]), mask=share(b["mask"]), x_mask=x_mask, fps=share(b["fps"]),
        frame_indices=share(b["frame_indices"]), pixel_size=torch.tensor([[8 * H, 8 * W]] * (2 * pairs)),
        tasks=tasks, bucket=f"{T}x{H}x{W}", ids=[f"p{k}#{r}" for k in range(pairs) for r in ("chosen", "rejected")],
        stream_index=stream_index, paired=True,
    )


def test_a_pair_shares_timestep_noise_and_text_dropout(tiny):
    null = (torch.zeros(1, tiny.config.caption_channels), torch.ones(1, dtype=torch.bool))
    batch = paired(tiny.config, pairs=4, seed=2)
    inputs, target = FlowDPOObjective(SEED, 0.5, null, beta=BETA).noised_inputs(batch)
    t = inputs["timestep"]
    assert torch.equal(t[0::2], t[1::2]) and len(set(t[0::2].tolist())) == 4
    eps = batch.latents - target  # v = x0 - eps (up to rounding)
    torch.testing.assert_close(eps[0::2], eps[1::2], rtol=0, atol=1e-6)
    assert (eps[0] - eps[2]).abs().max() > 1
    dropped = (inputs["mask"] != batch.mask).any(1)
    assert torch.equal(dropped[0::2], dropped[1::2]) and 0 < int(dropped.sum()) < 8
    with pytest.raises(ValueError, match="pairs dataset"):
        FlowDPOObjective(SEED, 0.0, None).noised_inputs(dataclasses.replace(batch, paired=False))


def dpo_worker(rank, world, layout: Layout, dit_kwargs, sd, ref_sd, batches):
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from mugv.checkpoint.keys import unwrap
    from mugv.models.megatron import padded_sequence_length
    from mugv.models.megatron.weight_map import release_to_chunk
    from mugv.training.reference import AdaptersOff, FrozenCopy, make_reference
    from mugv.training.step import DiTForwardStep

    cfg, model, opt = build_parallel(layout, dit_kwargs, sd, variable_seq_lengths=layout.pp > 1)
    reference = make_reference(cfg, model, torch.device("cpu"))
    if layout.lora:  # the policy with its adapters off: no parameters of its own
        assert isinstance(reference, AdaptersOff) and reference.param_bytes == 0
    else:
        assert isinstance(reference, FrozenCopy)
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        for c in reference.chunks:
            unwrap(c).load_state_dict(release_to_chunk(ref_sd, unwrap(c), tp_rank, layout.tp, cfg.dit.num_heads))
        assert all(not p.requires_grad for c in reference.chunks for p in c.parameters())
    step = DiTForwardStep(FlowDPOObjective(SEED, 0.0, None, beta=BETA), reference)
    dp_rank, dp = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    mine = batches[dp_rank::dp]
    for m in model:
        m.zero_grad_buffer()
    opt.zero_grad()
    seq = max(padded_sequence_length(cfg, *b.latents.shape[2:]) for b in mine)
    data = [iter(mine) for _ in model] if len(model) > 1 else iter(mine)
    results = get_forward_backward_func()(
        forward_step_func=step, data_iterator=data, model=model if len(model) > 1 else model[0],
        num_microbatches=len(mine), seq_length=seq, micro_batch_size=len(mine[0]), forward_only=False,
    )
    grads = to_release(model, "grad", layout.distopt, cfg.dit.num_heads)
    ok, _, _ = opt.step()
    assert ok
    params = to_release(model, "data", layout.distopt, cfg.dit.num_heads)
    terms = [r["per_sample"][0::2] for r in results]  # per-pair DPO losses (last stage)
    errs = [torch.stack([r["values"]["dpo/flow_loss_chosen"], r["values"]["dpo/flow_loss_rejected"]], 1).flatten()
            for r in results]  # per-sample flow errors of the policy
    return dict(terms=terms, errs=errs, dp_rank=dp_rank, grads=grads, params=params)


def dpo_reference(model, ref_model, batches):
    """Single process: mean over micro-batches of the mean per-pair Flow-DPO loss; grads, params after Adam."""
    objective = FlowDPOObjective(SEED, 0.0, None, beta=BETA)
    losses, terms, errs = [], [], []
    for b in batches:
        inputs, target = objective.noised_inputs(b)
        with torch.no_grad():
            ref_out = ref_model(**inputs)
        out = model(**inputs)
        result = objective.loss(out, target, b.x_mask, ref_out)
        losses.append(result.loss)
        terms.append(result.terms.detach())
        errs.append(flow_loss(out.detach(), target, b.x_mask))
    (sum(losses) / len(losses)).backward()
    trained = {k: p for k, p in model.named_parameters() if p.requires_grad}
    grads = {k: p.grad.detach().clone() for k, p in trained.items()}
    torch.optim.Adam(trained.values(), **ADAM).step()
    return terms, errs, grads, {k: p.detach().clone() for k, p in model.named_parameters()}


@pytest.fixture(scope="module")
def dpo_problem():
    model = tiny_model(seed=0, depth=4, num_heads=4, hidden_size=72)
    ref_model = copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad():  # a reference other than the policy: the loss is not log 2 at step 0
        for p in ref_model.parameters():
            p.add_(0.003 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    ref_sd = {k: v.detach().clone() for k, v in ref_model.state_dict().items()}
    batches = [paired(model.config, pairs=2, seed=10 + i, stream_index=i) for i in range(2)]
    terms, errs, grads, params = dpo_reference(model, ref_model, batches)
    assert all(float((t - math.log(2)).abs().min()) > 1e-3 for t in terms)
    return dict(TINY, depth=4, num_heads=4), sd, ref_sd, batches, (terms, errs), grads, params


@pytest.mark.parametrize("layout", [Layout(tp=2, sp=True, microbatches=2), Layout(pp=2, microbatches=2),
                                    Layout(pp=2, vpp=2, microbatches=2), Layout(dp=2)],
                         ids=["tp2_sp", "pp2", "vpp2x2", "dp2"])
def test_dpo_step_matches_single_process(layout, dpo_problem):
    kwargs, sd, ref_sd, batches, (ref_terms, ref_errs), ref_grads, ref_params = dpo_problem
    results = run_distributed(dpo_worker, layout.world, layout, kwargs, sd, ref_sd, batches, timeout=240)
    seen, keys = 0, set()
    for r in results:
        for i, (t, e) in enumerate(zip(r["terms"], r["errs"], strict=True)):
            j = r["dp_rank"] + i * layout.dp
            assert rel(e, ref_errs[j]) <= 1e-5, f"flow error rel err {rel(e, ref_errs[j]):.2e}"
            # the loss amplifies flow-error rounding (by up to beta/2)
            assert rel(t, ref_terms[j]) <= 1e-4, f"DPO loss rel err {rel(t, ref_terms[j]):.2e}"
            seen += 1
    for r in results:
        for k, g in r["grads"].items():
            assert rel(g, ref_grads[k]) <= 1e-4, f"grad {k}: rel err {rel(g, ref_grads[k]):.2e}"
            keys.add(k)
        for k, p in r["params"].items():
            assert rel(p, ref_params[k]) <= 1e-4, f"param {k}: rel err {rel(p, ref_params[k]):.2e}"
    assert seen >= len(batches) and keys == set(ref_grads), sorted(set(ref_grads) ^ keys)[:5]


@pytest.fixture(scope="module")
def lora_dpo_problem():
    """A LoRA policy (random A and B, base frozen) whose reference is the same network without its
    adapters: in the single process, a copy with B = 0."""
    from tests.megatron_parity import lora_reference_model

    # a small alpha / rank: adapters (with O(0.2) factors) that move the loss by O(1), not into saturation
    model = lora_reference_model(tiny_model(seed=0, depth=4, num_heads=4, hidden_size=72), **LORA)
    ref_model = copy.deepcopy(model).requires_grad_(False)
    with torch.no_grad():
        for name, p in ref_model.named_parameters():
            if "lora_B" in name:
                p.zero_()
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    batches = [paired(model.config, pairs=2, seed=10 + i, stream_index=i) for i in range(2)]
    terms, errs, grads, params = dpo_reference(model, ref_model, batches)
    assert grads and all(".lora_" in k for k in grads)
    assert all(float((t - math.log(2)).abs().min()) > 1e-3 for t in terms)
    return dict(TINY, depth=4, num_heads=4), sd, None, batches, (terms, errs), grads, params


@pytest.mark.parametrize("layout", [Layout(tp=2, sp=True, microbatches=2, lora=LORA), Layout(pp=2, microbatches=2, lora=LORA)],
                         ids=["tp2_sp", "pp2"])
def test_lora_dpo_step_matches_single_process(layout, lora_dpo_problem):
    test_dpo_step_matches_single_process(layout, lora_dpo_problem)


def reference_bytes_worker(rank, world, layout: Layout, dit_kwargs, sd):
    from mugv.training.reference import FrozenCopy

    cfg, model, _ = build_parallel(layout, dit_kwargs, sd)
    ref = FrozenCopy(cfg, model, torch.device("cpu"))
    policy = sum(p.numel() * p.element_size() for m in model for p in m.parameters())
    return ref.param_bytes, policy


def test_reference_is_sharded_like_the_policy(dpo_problem):
    """Per rank, the frozen copy holds exactly the policy's weight bytes at TP 1, 2, 4 and PP 2:
    the TP-split tensors shrink as 1/TP (the replicated ones, embedders and norms, do not)."""
    kwargs, sd = dpo_problem[0], dpo_problem[1]
    per_rank = {}
    for name, layout in {"tp1": Layout(), "tp2": Layout(tp=2), "tp4": Layout(tp=4), "pp2": Layout(pp=2)}.items():
        results = run_distributed(reference_bytes_worker, layout.world, layout, kwargs, sd, timeout=240)
        assert all(ref == policy for ref, policy in results), (name, results)
        per_rank[name] = max(ref for ref, _ in results)
    # bytes per rank = R + S / tp (R replicated, S split): R and S from TP 1 and 2 predict TP 4
    replicated = 2 * per_rank["tp2"] - per_rank["tp1"]
    split = per_rank["tp1"] - replicated
    assert per_rank["tp4"] == replicated + split // 4 and 0 < replicated < split / 2, per_rank
    assert per_rank["pp2"] < 0.65 * per_rank["tp1"], per_rank  # a stage holds half the layers
