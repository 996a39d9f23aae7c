"""Latent dataset format, LatentLoader batches, resume through workers, bad data, release CSV, data check."""

import csv
import glob
import itertools
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from mugv.cli.main import main as cli
from mugv.data import DataConfig, LatentLoader, MixConfig
from mugv.data.check import check_dataset
from mugv.data.dataset import BadDataError
from mugv.data.synthetic import write_synthetic_dataset

SHAPES = {(1, 4, 4): 10, (3, 4, 6): 8, (2, 8, 8): 4}  # images, and two video buckets
N = sum(SHAPES.values())


@pytest.fixture()
def ds(tmp_path):
    root = str(tmp_path / "ds")
    # ~3 KB per video sample: shards of 2-4 samples
    write_synthetic_dataset(root, SHAPES, text_dim=16, text_len=6, shard_bytes=6000)
    return root


def cfg_for(*paths, **kw):
    base = dict(paths=list(paths), token_budget=60, max_batch_size=4, num_workers=0, text_len=8, seed=3)
    return DataConfig(**{**base, **kw})


def first_values(batch):
    return [int(v) for v in batch.latents.reshape(len(batch), -1)[:, 0]]


def test_batches_hold_the_stored_samples(ds):
    loader = LatentLoader(cfg_for(ds, mix=MixConfig(task_weights={"t2i": 1, "t2v": 1, "i2v": 1})))
    assert len(glob.glob(os.path.join(ds, "shards", "*.safetensors"))) >= 5
    seen, tasks = [], []
    for batch in itertools.islice(iter(loader), loader.epoch_batches):
        b = len(batch)
        t, h, w = (int(v) for v in batch.bucket.split("x"))
        assert batch.latents.shape == (b, 24, t, h, w) and batch.latents.dtype == torch.float32
        L = max(1 + int(sid[1:]) % 6 for sid in batch.ids)  # the longest caption of the batch
        assert (
            batch.y.shape == (b, 1, L, 16) and batch.mask.shape == (b, L) and batch.mask.dtype == torch.bool
        )
        assert torch.equal(batch.frame_indices, torch.arange(t + 2).expand(b, -1))
        assert batch.pixel_size.tolist() == [[8 * h, 8 * w]] * b
        assert batch.num_tokens == t * ((h + 1) // 2) * ((w + 1) // 2) + 2
        for k, sid in enumerate(batch.ids):
            n = int(sid[1:])
            assert first_values(batch)[k] == n  # the latent really is sample n
            assert int(batch.mask[k].sum()) == 1 + n % 6  # text length as written, padded with zeros
            assert batch.y[k, 0, 1 + n % 6 :].abs().sum() == 0
            task = batch.tasks[k]
            assert task == ("t2i" if t == 1 else task)
            assert batch.x_mask[k].tolist() == [task != "i2v"] + [True] * (t - 1)
        seen += batch.ids
        tasks += batch.tasks
    assert len(seen) == N  # epoch size is the data size; shares 1/3 images, 2/3 videos
    assert tasks.count("t2i") == 7 and tasks.count("t2v") + tasks.count("i2v") == 15
    assert 2 <= tasks.count("i2v") <= 13
    assert loader.text_embeddings["null"][0].shape == (1, 16)


def test_resume_through_workers(ds):
    cfg = cfg_for(ds, num_workers=2)
    ref = LatentLoader(cfg)
    full = [b.ids for b in itertools.islice(iter(ref), 14)]
    first = LatentLoader(cfg)
    part = [b.ids for b in itertools.islice(iter(first), 5)]
    state = json.loads(json.dumps(first.state_dict()))  # must survive a JSON round-trip
    second = LatentLoader(cfg)
    second.load_state_dict(state)
    rest = [b.ids for b in itertools.islice(iter(second), 9)]
    assert part + rest == full


def _damage(root):
    """Delete one shard and truncate another; return the ids they held."""
    shards = sorted(glob.glob(os.path.join(root, "shards", "*.safetensors")))
    rows = [
        json.loads(x) for p in sorted(glob.glob(os.path.join(root, "manifest", "*.jsonl"))) for x in open(p)
    ]
    gone, cut = shards[1], shards[3]
    os.remove(gone)
    data = open(cut, "rb").read()
    open(cut, "wb").write(data[: len(data) // 2])
    return {r["id"] for r in rows if os.path.join(root, r["file"]) in (gone, cut)}


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_files_are_skipped_and_counted(ds, workers):
    bad = _damage(ds)
    assert len(bad) >= 2
    loader = LatentLoader(cfg_for(ds, max_bad_fraction=0.9, num_workers=workers))
    skipped, got, found = [], [], []
    for batch in itertools.islice(iter(loader), loader.epoch_batches):
        skipped += batch.skipped
        got += batch.ids
        found += [sid for sid, _ in batch.bad]
        assert len(batch) in (batch.planned, 0)  # refilled within the bucket, or empty (the step is skipped)
    assert sorted(skipped) == sorted(bad)  # each bad sample counted exactly once per epoch
    assert not set(got) & bad
    m = loader.metrics()
    assert m["data/bad_samples"] == len(bad) and m["data/attempted_samples"] == N
    assert abs(m["data/bad_fraction"] - len(bad) / N) < 1e-9
    assert loader.state_dict()["bad_samples"] == len(bad)
    assert len(found) == len(set(found))  # a bad sample is found once: never drawn again after that
    assert sorted(sid for sid, _ in loader.take_new_bad()) == sorted(bad) and not loader.take_new_bad()
    for batch in itertools.islice(iter(loader), loader.epoch_batches):  # the next epoch: known, not drawn
        assert not batch.bad and not set(batch.ids) & bad
    assert loader.metrics()["data/bad_samples"] == len(bad)

    strict = LatentLoader(cfg_for(ds, max_bad_fraction=0.05, bad_grace_samples=4))
    with pytest.raises(BadDataError, match="max_bad_fraction"):
        for _ in itertools.islice(iter(strict), 3 * strict.epoch_batches):
            pass


def test_non_finite_sample_is_bad(tmp_path):
    root = str(tmp_path / "nan")
    write_synthetic_dataset(root, {(2, 4, 4): 3}, text_dim=8, shard_bytes=1)  # one sample per shard
    shard = sorted(glob.glob(os.path.join(root, "shards", "*.safetensors")))[0]
    from safetensors.torch import load_file

    t = load_file(shard)
    t["s000000.latent"][0, 0, 0, 1] = float("nan")
    save_file(t, shard)
    loader = LatentLoader(cfg_for(root, token_budget=1000, check_finite=True))
    batch = next(iter(loader))
    assert batch.skipped == ["s000000"] and sorted(batch.ids) == ["s000001", "s000002"]
    report = check_dataset(root)
    assert not report.ok and any("non-finite" in p for p in report.problems)


def test_integer_latent_is_a_bad_sample_and_data_check_reads_every_row(tmp_path):
    root = str(tmp_path / "ints")
    write_synthetic_dataset(root, {(2, 4, 4): 40}, text_dim=8, shard_bytes=1)  # one sample per shard
    shards = sorted(glob.glob(os.path.join(root, "shards", "*.safetensors")))
    from safetensors.torch import load_file

    t = load_file(shards[0])
    t["s000000.latent"] = t["s000000.latent"].to(torch.int32)  # silently converted before
    save_file(t, shards[0])
    t = load_file(shards[37])
    t["s000037.latent"][0, 0, 0, 0] = float("nan")
    save_file(t, shards[37])
    loader = LatentLoader(cfg_for(root, token_budget=10000, max_batch_size=64, max_bad_fraction=1.0))
    batch = next(iter(loader))
    assert "s000000" in batch.skipped and "s000000" not in batch.ids
    assert dict(batch.bad)["s000000"].endswith("s000000.latent is stored as I32, not a float type")
    report = check_dataset(root)  # every row by default: the one NaN among 40 is found
    assert report.values_checked == 39 and any("s000037: latent has non-finite" in p for p in report.problems)
    assert any("s000000.latent: dtype I32, expected a float type" in p for p in report.problems)


def _write_release(tmp_path, n=4, missing=()):
    base = tmp_path / "rel"
    (base / "latents").mkdir(parents=True)
    (base / "text_features").mkdir()
    g = torch.Generator().manual_seed(0)
    rows = []
    for k in range(n):
        sid = f"video_{k:03d}"
        lat = torch.randn(24, 2, 4, 6, generator=g)
        if k == 0:
            lat = lat[None]  # a leading batch dim of 1 is accepted
        torch.save(lat, base / "latents" / f"{sid}.pt")
        L = 10
        mask = torch.zeros(1, L, dtype=torch.bool)
        mask[0, : 3 + k] = True
        torch.save(
            {"y": torch.randn(1, 1, L, 16, generator=g), "mask": mask},
            base / "text_features" / f"{sid}_text.pt",
        )
        rows.append(
            [sid, "real" if k % 2 else "generated", f"latents/{sid}.pt", f"text_features/{sid}_text.pt"]
        )
    for k in missing:
        os.remove(base / "latents" / f"video_{k:03d}.pt")
    path = base / "train.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([["sample_id", "source", "latent_path", "text_feat_path"], *rows])
    stats = base / "vae_stats.pt"
    torch.save(
        {"shift": torch.full((1, 24, 1, 1, 1), 0.5), "scale": torch.full((1, 24, 1, 1, 1), 2.0)}, stats
    )
    return str(path), str(stats)


def test_release_csv(tmp_path):
    path, stats = _write_release(tmp_path)
    loader = LatentLoader(
        cfg_for(path, token_budget=200, text_len=0, release_vae_stats=stats, default_fps=24.0)
    )
    batch = next(iter(loader))
    assert batch.bucket == "2x4x6" and len(batch) == 4 and batch.tasks == ["t2v"] * 4
    assert batch.pixel_size.tolist() == [[32, 48]] * 4 and batch.fps.tolist() == [24.0] * 4
    assert batch.y.shape == (4, 1, 6, 16)  # trimmed to the longest caption (3 + k real tokens)
    pos = {sid: k for k, sid in enumerate(batch.ids)}
    assert [int(batch.mask[pos[f"video_{k:03d}"]].sum()) for k in range(4)] == [3, 4, 5, 6]
    base = os.path.dirname(path)
    raw = torch.load(os.path.join(base, "latents", "video_001.pt"))
    assert torch.allclose(batch.latents[pos["video_001"]], (raw - 0.5) / 2.0)  # "real": normalised
    gen = torch.load(os.path.join(base, "latents", "video_002.pt"))
    assert torch.equal(batch.latents[pos["video_002"]], gen)  # "generated": as stored
    assert check_dataset(path).ok
    assert os.path.isfile(path + ".mugv-shapes.json")

    no_stats = LatentLoader(cfg_for(path, token_budget=200, max_bad_fraction=1.0))
    b = next(iter(no_stats))
    assert sorted(b.skipped) == ["video_001", "video_003"]  # "real" rows without vae stats are bad


def test_release_csv_missing_file(tmp_path):
    path, stats = _write_release(tmp_path, missing=(2,))
    loader = LatentLoader(cfg_for(path, token_budget=200, release_vae_stats=stats, max_bad_fraction=0.5))
    assert len(loader.records) == 3 and loader.metrics()["data/bad_samples"] == 1
    report = check_dataset(path)
    assert not report.ok and "video_002" in report.problems[0]
    assert cli(["data", "check", path]) == 1


def test_data_check(ds, tmp_path, capsys):
    assert cli(["data", "check", ds]) == 0
    assert "22 samples" in capsys.readouterr().out
    # a manifest row whose shape disagrees with the shard
    part = sorted(glob.glob(os.path.join(ds, "manifest", "*.jsonl")))[0]
    rows = [json.loads(x) for x in open(part)]
    rows[0]["shape"] = [1, 4, 5]
    rows[0]["width"] = 40
    open(part, "w").writelines(json.dumps(r) + "\n" for r in rows)
    report = check_dataset(ds)
    assert any("shape [24, 1, 4, 4] != manifest [24, 1, 4, 5]" in p for p in report.problems)
    assert any("not a multiple of 16" in p for p in report.problems)
    bad = _damage(ds)
    report = check_dataset(ds)
    assert any("missing" in p for p in report.problems) and any("unreadable" in p for p in report.problems)
    assert cli(["data", "check", ds]) == 1
    assert cli(["data", "check", str(tmp_path / "nowhere")]) == 1
    assert bad


def test_data_stats_cli(ds, capsys):
    assert cli(["data", "stats", ds, "--set", "token_budget=60", "--set", "max_batch_size=4"]) == 0
    out = capsys.readouterr().out
    assert "22 samples (0 unreadable rows), 10 micro-batches per epoch" in out  # ceil(10/4)+ceil(8/3)+4
    assert "micro-batch 4" in out and "micro-batch 3" in out and "micro-batch 1" in out
