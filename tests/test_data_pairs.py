"""Preference pairs: real clips -> `prep --pairs` -> `data check` -> loader batches of whole pairs."""

import itertools
import os

import pytest
import torch

from mugv.cli.main import main as cli
from mugv.data import BucketTable, DataConfig, LatentLoader
from mugv.data.check import check_dataset
from mugv.data.prep import PrepConfig, run_prep
from mugv.data.prep.media import _read_av
from mugv.data.store import DatasetWriter, PreparedSample, read_failures, read_records
from mugv.data.synthetic import write_synthetic_dataset, write_synthetic_pairs
from tests.test_data_prep import DATA, TABLE, StandInText, StandInVAE

BUNNY, CAR, CAR_BAD = (os.path.join(DATA, f) for f in ("bigbuckbunny.mp4", "carphone_pristine.mp4",
                                                        "carphone_distorted.mp4"))


def _pairs_file(tmp_path) -> str:
    import numpy as np
    from PIL import Image

    Image.fromarray(np.zeros((64, 64, 3), dtype=np.uint8)).save(tmp_path / "still.png")
    rows = [
        ("a man on the phone in a car", CAR, CAR_BAD),  # same source size: one bucket as read
        ("a rabbit wakes up", BUNNY, CAR),  # 16:9 vs 176x144: the rejected clip is cropped to the chosen's bucket
        ("a still", "still.png", CAR),  # an image paired with a video
        ("gone", "nope.mp4", CAR),
    ]
    path = tmp_path / "pairs.csv"
    path.write_text("caption,chosen,rejected\n" + "".join(f'"{c}",{a},{b}\n' for c, a, b in rows))
    return str(path)


def test_pairs_prep_check_and_loader(tmp_path):
    out = str(tmp_path / "ds")
    cfg = PrepConfig(pairs=_pairs_file(tmp_path), output=out, buckets=TABLE, fps=20.0, shard_mb=1, log_every_s=0.0)
    cfg.validate()
    summary = run_prep(cfg, StandInVAE(), StandInText())
    assert (summary.items, summary.written, summary.clips) == (4, 2, 4)
    assert {f["reason"] for f in read_failures(out)} == {"pair_mismatch", "missing"}

    recs = {r.id: r for r in read_records(out)[0]}
    car_pair, bunny_pair = f"{CAR}|{CAR_BAD}", f"{BUNNY}|{CAR}"
    assert sorted(recs) == sorted(f"{p}#{role}" for p in (car_pair, bunny_pair) for role in ("chosen", "rejected"))
    for pid, bucket in ((car_pair, "5x10x10"), (bunny_pair, "5x8x14")):  # 132 frames at 25 fps -> 33 at 20 fps
        c, r = recs[f"{pid}#chosen"], recs[f"{pid}#rejected"]
        assert (c.pair, c.role, r.pair, r.role) == (pid, "chosen", pid, "rejected")
        assert c.bucket == r.bucket == bucket and c.caption == r.caption and c.y_key == r.y_key
    # the rejected clip of the bunny pair is the carphone video cropped to the bunny's 64x112 bucket
    from safetensors import safe_open

    rej = recs[f"{bunny_pair}#rejected"]
    with safe_open(rej.latent_file, "pt") as f:
        stored = f.get_tensor(rej.latent_key)
    clip = _read_av(CAR, BucketTable(sizes=((64, 112),), num_frames=(33,)), 20.0, 1)[0]
    expect = StandInVAE().encode(clip.pixels.float().div(127.5).sub(1).permute(1, 0, 2, 3)[None])[0]
    assert torch.allclose(stored, expect, atol=1e-5)

    report = check_dataset(out, value_samples=-1)
    assert report.ok and report.pairs == 2, report.format()
    assert cli(["data", "check", out]) == 0

    for workers in (0, 1):
        loader = LatentLoader(DataConfig(paths=[out], token_budget=1000, num_workers=workers, text_len=0))
        assert loader.paired
        seen = []
        for batch in itertools.islice(iter(loader), 2 * loader.epoch_batches):
            assert batch.paired and len(batch) % 2 == 0
            for k in range(0, len(batch), 2):
                pid = batch.ids[k].rsplit("#", 1)[0]
                assert batch.ids[k : k + 2] == [f"{pid}#chosen", f"{pid}#rejected"]
                assert torch.equal(batch.y[k], batch.y[k + 1]) and batch.tasks[k] == batch.tasks[k + 1]
                assert not torch.equal(batch.latents[k], batch.latents[k + 1])
                seen.append(pid)
        assert sorted(set(seen)) == sorted([car_pair, bunny_pair]) and len(seen) == 4  # two epochs


def test_pairs_budget_counts_both_clips_and_bad_pairs_are_refused(tmp_path):
    write_synthetic_pairs(str(tmp_path / "pairs"), {(1, 4, 4): 8}, text_dim=8, text_len=4)
    # 6 tokens a clip: a budget of 48 tokens holds 4 pairs (8 clips)
    batch = next(iter(LatentLoader(DataConfig(paths=[str(tmp_path / "pairs")], num_workers=0, token_budget=48))))
    assert len(batch) == 8 and batch.planned == 8

    # a pair without its rejected clip, and a pairs dataset mixed with plain samples
    bad = str(tmp_path / "bad")
    w = DatasetWriter(bad)
    w.write_meta(24, 8, {"null": ""}, pairs=True)
    w.write_text_embeddings({"null": (torch.zeros(1, 8), torch.ones(1, dtype=torch.bool))})
    y, m = torch.zeros(2, 8), torch.ones(2, dtype=torch.bool)
    w.add_item("x", [PreparedSample("x#chosen", torch.zeros(24, 1, 4, 4), y, m, 1.0, 1, 32, 32, "t2i",
                                    extra={"pair": "x", "role": "chosen"})])
    w.close()
    report = check_dataset(bad)
    assert not report.ok and "pair 'x': 1 chosen and 0 rejected" in report.format()
    with pytest.raises(ValueError, match="bad preference pairs"):
        LatentLoader(DataConfig(paths=[bad], num_workers=0))
    write_synthetic_dataset(str(tmp_path / "plain"), {(1, 4, 4): 2}, text_dim=8, text_len=4)
    with pytest.raises(ValueError, match="cannot be mixed with plain samples"):
        LatentLoader(DataConfig(paths=[str(tmp_path / "pairs"), str(tmp_path / "plain")], num_workers=0))
