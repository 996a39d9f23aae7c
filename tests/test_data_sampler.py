"""BucketBatchSampler: coverage across DP ranks, exact resume (mid-epoch, across epochs, new DP size), mixing."""

import itertools
from collections import Counter

import pytest

from mugv.data.buckets import batch_size_for
from mugv.data.config import DataConfig, MixConfig
from mugv.data.sampler import BucketBatchSampler

# 3 buckets: images 1x4x4 (tokens 6 -> bs 8 with budget 50), video 3x4x6 (tokens 20 -> bs 2),
# video 2x8x8 (tokens 34 -> bs 1)
BUCKETS = ["1x4x4"] * 29 + ["3x4x6"] * 17 + ["2x8x8"] * 6
TASKS = ["t2i" if b.startswith("1x") else "t2v" for b in BUCKETS]


def make(rank=0, size=1, seed=5, **kw):
    cfg = DataConfig(token_budget=50, max_batch_size=8, seed=seed, **kw)
    return BucketBatchSampler(BUCKETS, TASKS, cfg, rank, size)


def take(sampler, n):
    """Consume n batches like the loader does (mark each consumed)."""
    out = []
    for req in itertools.islice(iter(sampler), n):
        sampler.mark_consumed(req.stream_index)
        out.append(req)
    return out


def test_batch_sizes_and_epoch_length():
    s = make()
    assert [(b.name, b.batch_size) for b in s.buckets] == [("1x4x4", 8), ("2x8x8", 1), ("3x4x6", 2)]
    assert s.epoch_batches == 4 + 6 + 9  # ceil(29/8) + 6 + ceil(17/2)
    assert batch_size_for(14, 90, 160, 50402, 64) == 1
    assert batch_size_for(10, 90, 160, 2 * 50402, 64) == 2  # 10*45*80+2 = 36002 tokens
    assert batch_size_for(1, 90, 160, 50402, 64) == 13  # 3602 tokens
    assert batch_size_for(1, 90, 160, 50402, 4) == 4
    assert batch_size_for(1, 90, 160, 50402, 64, {"1x90x160": 3}) == 3


@pytest.mark.parametrize("dp", [1, 3, 4])
def test_epoch_covers_every_sample_once_across_ranks(dp):
    E = make().epoch_batches
    rounds = -(-E // dp)
    seen = []
    for r in range(dp):
        for req in take(make(r, dp), rounds):
            if req.stream_index < E:
                seen += req.indices
                assert len({BUCKETS[i] for i in req.indices}) == 1 and BUCKETS[req.indices[0]] == req.bucket
    assert sorted(seen) == list(range(len(BUCKETS)))
    # the next epoch is a different order of the same samples
    a, b = make().epoch_plan(0), make().epoch_plan(1)
    assert [r.indices for r in a] != [r.indices for r in b]
    assert sorted(i for r in b for i in r.indices) == list(range(len(BUCKETS)))


def _stream(dp, n_rounds, seed=5):
    """Uninterrupted per-rank batch lists."""
    return [[r.indices for r in take(make(k, dp, seed), n_rounds)] for k in range(dp)]


@pytest.mark.parametrize("stop", [5, 19, 23])  # mid-epoch, exactly at the boundary (E=19), past it
def test_exact_resume(stop):
    dp, total = 2, 30
    ref = _stream(dp, total)
    for k in range(dp):
        s = make(k, dp)
        first = [r.indices for r in take(s, stop)]
        state = s.state_dict()
        assert state["epoch"] * s.epoch_batches + state["position"] == stop * dp
        fresh = make(k, dp)
        fresh.load_state_dict(state)
        rest = [r.indices for r in take(fresh, total - stop)]
        assert first + rest == ref[k]


@pytest.mark.parametrize("old,new", [(4, 3), (2, 5), (3, 1)])
def test_resume_with_new_dp_size(old, new):
    E = make().epoch_batches
    stop = 7  # rounds at the old size
    before, state = [], None
    for r in range(old):
        s = make(r, old)
        before += [(q.stream_index, q.indices) for q in take(s, stop)]
        state = s.state_dict()
    after = []
    rounds = -(-(3 * E - stop * old) // new)
    for r in range(new):
        s = make(r, new)
        s.load_state_dict(state)
        after += [(q.stream_index, q.indices) for q in take(s, rounds)]
    got = sorted(before + after)
    # every global batch exactly once, in the same content as the uninterrupted stream
    ref = make()
    idx = [g for g, _ in got]
    assert idx == list(range(len(idx))) and len(idx) >= 3 * E
    assert all(ref.request(g).indices == ind for g, ind in got)
    for epoch in range(3):
        samples = [i for g, ind in got if epoch * E <= g < (epoch + 1) * E for i in ind]
        assert sorted(samples) == list(range(len(BUCKETS)))


def test_seed_changes_order_and_same_seed_repeats():
    assert [r.indices for r in make(seed=1).epoch_plan(0)] == [r.indices for r in make(seed=1).epoch_plan(0)]
    assert [r.indices for r in make(seed=1).epoch_plan(0)] != [r.indices for r in make(seed=2).epoch_plan(0)]


def test_task_mix_and_bucket_weights():
    mix = MixConfig(task_weights={"t2i": 1.0, "t2v": 1.0, "i2v": 2.0})
    s = make(mix=mix)
    # epoch size stays 52 samples: 1/4 images (13 of 29), 3/4 videos (39 of 23 -> repeats)
    assert s.targets == [13, 10, 29]  # 1x4x4, 2x8x8 (39 * 6/23), 3x4x6 (39 * 17/23)
    counts = Counter(t for r in s.epoch_plan(0) for t in r.tasks)
    assert counts["t2i"] == 13
    assert counts["t2v"] + counts["i2v"] == 39
    assert counts["i2v"] == 23  # seeded: each video sample is I2V with p = 2/3 (26 expected)
    # over 40 epochs (1560 video samples) the share is 2/3 within 3 sigma (0.036); p = 1/2 is 4.6 sigma off
    many = Counter(t for e in range(40) for r in s.epoch_plan(e) for t in r.tasks)
    assert abs(many["i2v"] / (many["i2v"] + many["t2v"]) - 2 / 3) < 3 * (2 / 9 / 1560) ** 0.5
    plan = s.epoch_plan(0)
    per_epoch = Counter(i for r in plan for i in r.indices)
    assert max(per_epoch[i] for i in range(29, 52)) == 2  # videos repeated up to twice, not more

    w = make(mix=MixConfig(bucket_weights={"2x8x8": 0.0}))
    assert w.targets == [29, 0, 23]  # the videos' share goes to the other video bucket
    assert all(r.bucket != "2x8x8" for r in w.epoch_plan(0))


def test_bad_config_rejected():
    with pytest.raises(ValueError, match="unknown task 'x2v'"):
        DataConfig(mix=MixConfig(task_weights={"x2v": 1.0})).validate()
    with pytest.raises(ValueError, match="dp_rank 3"):
        make(3, 3)


def test_data_config_loads_from_yaml_and_overrides(tmp_path):
    from mugv.config.loader import ConfigError, load_config

    path = tmp_path / "data.yaml"
    path.write_text("token_budget: 50\nmax_batch_size: 8\nmix:\n  task_weights: {t2i: 1.0, t2v: 1.0}\n")
    cfg = load_config(DataConfig, str(path), ["batch_sizes.3x4x6=5", "mix.bucket_weights.2x8x8=2.0"])
    assert cfg.mix.task_weights == {"t2i": 1.0, "t2v": 1.0} and cfg.batch_sizes == {"3x4x6": 5}
    s = BucketBatchSampler(BUCKETS, TASKS, cfg)
    assert [b.batch_size for b in s.buckets] == [8, 1, 5]
    assert s.targets == [
        26,
        11,
        15,
    ]  # half images / half videos of 52; 2x8x8 weighted x2: 26 * 12/29, 26 * 17/29
    with pytest.raises(ConfigError, match="max_bad_fraction"):
        load_config(DataConfig, None, ["max_bad_fraction=2"])
