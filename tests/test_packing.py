"""Packed micro-batches: the packed layout, block-diagonal attention, the step planner (balance by
FLOPs, token budget, mix), the packed sampler (deterministic, exact resume, safe under a DP-size
change) and the loader building packed batches."""

import itertools
import json

import pytest
import torch
import torch.nn.functional as F

from mugv.data.config import DataConfig, MixConfig
from mugv.data.packed_sampler import MAX_WAIT, PackedBatchSampler, PlanState
from mugv.data.packing import Item, plan_step
from mugv.data.sampler import BucketBatchSampler
from mugv.models.layout import PackedLayout, TokenLayout, segment_spans
from mugv.models.megatron.packed import attend_spans

# images 1x4x4 (6 tokens), clips 3x4x6 (20 tokens) and 2x8x8 (34 tokens); cost ~ tokens^2 (attention)
BUCKETS = ["1x4x4"] * 29 + ["3x4x6"] * 17 + ["2x8x8"] * 6
TASKS = ["t2i" if b.startswith("1x") else "t2v" for b in BUCKETS]


def cost(t, h, w):
    n = t * -(-h // 2) * -(-w // 2) + 2
    return float(n * n)


def make(rank=0, size=1, seed=5, microbatches=2, **kw):
    cfg = DataConfig(token_budget=50, max_batch_size=8, seed=seed, packing=True, **kw)
    return PackedBatchSampler(BUCKETS, TASKS, cfg, rank, size, microbatches, cost)


def steps(sampler, dp, n, state=None):
    """n steps from `state`: per step, per rank, the list of micro-batches (lists of stream indices)."""
    out, state = [], state or sampler.start
    for _ in range(n):
        plan, state = sampler.plan(state, dp)
        out.append([[[it.q for it in b.items] for b in bins] for bins in plan.ranks])
    return out, state


# ------------------------------------------------------------------ layout and attention


def test_packed_layout_is_the_samples_layouts_one_after_another():
    samples = (TokenLayout(2, 3, 4), TokenLayout(1, 2, 2), TokenLayout(3, 1, 3))
    full = PackedLayout(samples)
    assert full.bounds == (0, 26, 32, 43) and full.row_offsets == (0, 3, 5, 9)
    fis = [torch.arange(s.T + 2) + 7 * k for k, s in enumerate(samples)]
    want = torch.cat([s.positions(fi[None]) for s, fi in zip(samples, fis)], dim=1)
    torch.testing.assert_close(full.positions(fis), want)
    for lo, hi in [(0, 43), (20, 30), (30, 48)]:  # a shard across samples; one past the end (padding)
        pos = full.shard(lo, hi).positions(fis)
        torch.testing.assert_close(pos[:, : min(hi, 43) - lo], want[:, lo : min(hi, 43)])
        # every held token gets exactly one table row, its own sample's
        runs = full.shard(lo, hi).runs()
        assert sum(r.frames * r.per_frame for r in runs) == hi - lo
    assert segment_spans(full.bounds, 20, 48) == [(0, 6, 0, 26, 0), (6, 12, 26, 32, 1), (12, 28, 32, 43, 2)]


def test_varlen_kernel_gets_the_spans_right():
    """The flash-attn variable-length call (GPU) is built from the spans: checked with a stand-in
    kernel that runs SDPA per cumulative-length segment."""
    def fake_varlen(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, causal):
        assert not causal and dropout_p == 0.0 and q.dim() == 3
        assert max_q == max(cu_q[1:] - cu_q[:-1]) and max_k == max(cu_k[1:] - cu_k[:-1])
        outs = [F.scaled_dot_product_attention(*(t.transpose(0, 1) for t in (q[a:b], k[c:d], v[c:d])))
                for a, b, c, d in zip(cu_q[:-1], cu_q[1:], cu_k[:-1], cu_k[1:])]
        return torch.cat([o.transpose(0, 1) for o in outs])

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 48, 6, generator=g) for _ in range(3))
    spans = segment_spans((0, 26, 32, 43), 28, 48)  # queries [28, 48) of a 43-token sequence + padding
    ref = torch.cat(attend_spans(q[:, :, 28:48], k, v, spans), dim=2)
    got = attend_spans(q[:, :, 28:48], k, v, spans, varlen=fake_varlen)
    assert len(got) == 1
    torch.testing.assert_close(got[0], ref)


# ------------------------------------------------------------------ the planner


def test_planner_balances_flops_where_dealing_by_tokens_cannot():
    """Heavy clips (one fills a micro-batch, 4x the cost of the light one with the same slot)
    whose count does not divide over the ranks: plain dealing leaves one rank a heavy clip
    ahead; the planner defers or swaps until ranks are within 1%."""
    heavy = [Item(q, 50, 2500.0, 0) for q in range(0, 25)]
    light = [Item(q, 36, 1300.0, 1) for q in range(25, 60)]
    images = [Item(q, 4, 16.0, 2) for q in range(60, 90)]
    pool = sorted(heavy + light + images, key=lambda it: (it.q * 7919) % 97)
    plan = plan_step(pool, 0, ranks=4, bins=8, budget=50, max_samples=8)
    assert plan.balance >= 0.99, plan.costs
    dealt = plan_step(pool, 0, ranks=4, bins=8, budget=50, max_samples=8, max_moves=0)
    assert dealt.balance < 0.97, dealt.costs  # what the first pass alone gives
    placed = [it.q for bins in plan.ranks for b in bins for it in b.items]
    assert sorted(placed + [it.q for it in plan.deferred]) == list(range(90))  # each item once
    for bins in plan.ranks:
        for b in bins:
            assert b.items and b.tokens <= 50 and len(b.items) <= 8


def test_locked_items_are_placed():
    pool = [Item(q, 50, 2500.0, 0) for q in range(12)] + [Item(q, 36, 1300.0, 1) for q in range(12, 30)]
    plan = plan_step(pool, 5, ranks=2, bins=4, budget=50, max_samples=8)
    placed = {it.q for bins in plan.ranks for b in bins for it in b.items}
    assert set(range(5)) <= placed


# ------------------------------------------------------------------ the sampler


def test_steps_fill_the_budget_balance_and_keep_the_mix():
    """Against the bucket sampler on the same data and config (mugv.data.plan_report): fuller
    micro-batches, never above the budget, ranks balanced by cost, the configured mix."""
    from mugv.data.plan_report import draw_steps, summarize

    cfg = DataConfig(token_budget=50, max_batch_size=8, seed=5, mix=MixConfig(task_weights={"t2v": 2.0, "t2i": 1.0}))
    got = {}
    for packing in (False, True):
        cfg.packing = packing
        s = PackedBatchSampler(BUCKETS, TASKS, cfg, 0, 3, 4, cost) if packing else BucketBatchSampler(BUCKETS, TASKS, cfg, 0, 3)
        got[packing] = summarize(draw_steps(s, 3, 4, 60), s, BUCKETS, 50, cost)
    bucketed, packed = got[False], got[True]
    print(f"bucketed: {bucketed.format()}\npacked: {packed.format()}")
    assert packed.max_fill <= 1.0 and packed.over_budget == 0
    assert packed.fill > bucketed.fill + 0.05
    assert packed.balance >= 0.98 > bucketed.balance
    assert packed.share_error < 2.0


def test_stream_covered_once_deterministic_and_seeded():
    s, state = make(), PlanState()
    for _ in range(30):  # no sample waits longer than MAX_WAIT steps
        state = s.plan(state, 2)[1]
        assert all(w <= MAX_WAIT for _, w in state.deferred)
    a, state = steps(make(), 2, 30)
    b, _ = steps(make(), 2, 30)
    assert a == b
    c, _ = steps(make(seed=6), 2, 30)
    assert a != c
    used = [q for step in a for mbs in step for mb in mbs for q in mb]
    # every stream sample before the position was used exactly once, except those still deferred
    assert sorted(used + [q for q, _ in state.deferred]) == list(range(state.position))
    # and an epoch is every sample the targets ask for
    recs, _, _ = make().epoch(0)
    assert sorted(recs.tolist()) == list(range(len(BUCKETS)))


@pytest.mark.parametrize("old,new", [(2, 2), (4, 3), (2, 5), (3, 1)])
def test_resume_exact_and_under_a_new_dp_size(old, new):
    """Consume k steps like the loader (per rank, marking each micro-batch), save the state,
    resume with a new DP size: the rest is the plan from that state at the new size, and no
    sample is repeated or skipped."""
    k = 4
    samplers = [make(r, old) for r in range(old)]
    for s in samplers:
        for req in itertools.islice(iter(s), k * s.microbatches):
            s.mark_consumed(req.stream_index)
    states = [s.state_dict() for s in samplers]
    assert all(st == states[0] for st in states)
    json.dumps(states[0])  # small and serialisable
    before, at = steps(make(), old, k)
    assert PlanState(states[0]["position"], tuple(map(tuple, states[0]["deferred"])), states[0]["issued"]) == at
    resumed = [make(r, new) for r in range(new)]
    for s in resumed:
        s.load_state_dict(states[0])
    got = [[sorted(i for p in req.parts for i in p.indices) for req in itertools.islice(iter(s), 3 * s.microbatches)]
           for s in resumed]
    after, end = steps(make(), new, 3, at)
    s0 = make()
    want = [[sorted(s0.sample(q)[0] for q in mb) for step in after for mb in step[r]] for r in range(new)]
    assert got == want
    used = [q for plan in (before, after) for step in plan for mbs in step for mb in mbs for q in mb]
    assert sorted(used + [q for q, _ in end.deferred]) == list(range(end.position))  # none twice, none skipped
    issued = [req.stream_index for s in resumed for req in itertools.islice(iter(s), s.microbatches)]
    assert len(set(issued)) == len(issued) and min(issued) == at.issued


def test_checkpoint_of_the_bucket_sampler_resumes_at_the_next_epoch():
    cfg = DataConfig(token_budget=50, max_batch_size=8, seed=5)
    old = BucketBatchSampler(BUCKETS, TASKS, cfg)
    old.consumed = 3 * old.epoch_batches + 2
    s = make()
    s.load_state_dict(old.state_dict())
    assert s.start.position == 4 * s.epoch_samples and s.start.deferred == ()


# ------------------------------------------------------------------ the loader and `mugv data plan`


def test_loader_builds_packed_batches(tmp_path):
    from mugv.data.batch import PackedBatch
    from mugv.data.loader import LatentLoader
    from mugv.data.synthetic import write_synthetic_dataset

    path = str(tmp_path / "ds")
    write_synthetic_dataset(path, {(1, 4, 4): 9, (2, 4, 6): 5}, text_dim=16, text_len=6)
    cfg = DataConfig(paths=[path], token_budget=40, num_workers=1, packing=True, seed=3)
    loader = LatentLoader(cfg, 0, 1, microbatches=2)
    batches = list(itertools.islice(iter(loader), 6))
    assert all(isinstance(b, PackedBatch) for b in batches)
    mixed = [b for b in batches if len(b.parts) > 1]
    assert mixed, "no micro-batch mixed images and clips"
    for b in batches:
        assert b.num_tokens <= 40
        for p in b.parts:
            assert len({tuple(p.latents.shape[2:])}) == 1 and p.bucket == "x".join(map(str, p.latents.shape[2:]))
            assert p.stream_index == b.stream_index
    state = loader.state_dict()
    assert state["sampler"]["packed"] and state["sampler"]["issued"] == 6


def test_data_plan_cli(tmp_path, capsys):
    from mugv.cli.main import main

    out = tmp_path / "plan.json"
    code = main(["data", "plan", "configs/stages/10b_b_joint_lowres.yaml", "data.packing=true", "--dp", "4",
                 "--steps", "3", "--synthetic", "14x32x56=40,10x32x56=20,1x32x32=60", "--json", str(out)])
    assert code == 0
    text = capsys.readouterr().out
    assert "balance" in text and "token fill" in text and "samples per step" in text
    plan = json.loads(out.read_text())
    assert len(plan) == 3 and len(plan[0]) == 4 and len(plan[0][0]) == 4  # steps, DP ranks, micro-batches
    sample = plan[0][0][0][0]
    assert set(sample) == {"id", "shape"} and len(sample["shape"]) == 3
