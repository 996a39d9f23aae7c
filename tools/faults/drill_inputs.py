"""Fault-drill scenarios about inputs: corrupt checkpoints, a full disk, damaged data, bad configs,
bad conversion and sampling inputs (tools/fault_drill.py)."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import time

from drill_harness import Drill, Job, Outcome, kill_all, latest_step, line_with, processes_of

CORRUPTIONS = {
    "flipped bytes in a shard": lambda c: _flip(os.path.join(c, "__1_0.distcp")),
    "truncated shard": lambda c: os.truncate(os.path.join(c, "__0_1.distcp"), 1000),
    "deleted shard": lambda c: os.remove(os.path.join(c, "__1_1.distcp")),
    "empty common.pt": lambda c: os.truncate(os.path.join(c, "common.pt"), 0),
    "garbage common.pt": lambda c: open(os.path.join(c, "common.pt"), "wb").write(b"not a torch file"),
    "truncated .metadata": lambda c: os.truncate(os.path.join(c, ".metadata"), 100),
}


def _flip(path: str) -> None:
    with open(path, "r+b") as f:
        f.seek(4096)
        f.write(b"\0" * 512)


def corrupt(d: Drill, kind: str) -> Outcome:
    base = os.path.join(d.root, "corrupt_base")
    if not os.path.isdir(base):
        Job(d, base, "checkpoint.interval=2", steps=4).finish()
    run_dir = d.fresh("corrupt")
    shutil.copytree(base, run_dir)
    CORRUPTIONS[kind](os.path.join(run_dir, "checkpoints", "step_00000004"))
    resumed, out = d.resume_to(run_dir, 6, "checkpoint.interval=2")
    ok = resumed and "step_00000002, the newest checkpoint that verifies" in out
    return Outcome(ok, 2, line_with(out, "does not verify"))


def disk_full(d: Drill) -> Outcome:
    mnt = os.path.join(d.root, "tmpfs")
    os.makedirs(mnt, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=10m", "tmpfs", mnt], capture_output=True).returncode == 0
    if not mounted:
        return Outcome(False, None, "not run: cannot mount a tmpfs here (needs root)")
    try:
        run_dir = os.path.join(mnt, "run")  # a checkpoint is ~6 MB: the second one does not fit
        job = Job(d, run_dir, "checkpoint.interval=2", "checkpoint.keep_last=5", steps=8)
        rc = job.finish()
        from mugv.checkpoint.integrity import verify

        left = latest_step(run_dir)
        intact = left is not None and not verify(os.path.join(run_dir, "checkpoints", f"step_{left:08d}"))[0]
        msg = line_with(job.output, "the disk is full", width=160)
        ok = rc != 0 and "the disk is full" in msg and "step_00000004.tmp" in msg and intact and not processes_of(run_dir)
        return Outcome(ok, 4 - left if left else None, f"previous intact: {intact}; {msg}")
    finally:
        kill_all(os.path.join(mnt, "run"))
        subprocess.run(["umount", "-l", mnt], capture_output=True)


def damaged_data(d: Drill) -> Outcome:
    import torch
    from safetensors.torch import load_file, save_file

    from mugv.data.synthetic import write_synthetic_dataset

    data = os.path.join(d.fresh("data"), "ds")
    write_synthetic_dataset(data, {(1, 4, 4): 12, (2, 4, 6): 6, (2, 8, 8): 2}, text_dim=32, text_len=8, shard_bytes=1)
    shards = sorted(glob.glob(os.path.join(data, "shards", "*.safetensors")))
    os.remove(shards[0])  # a missing file
    os.truncate(shards[13], 100)  # a truncated one
    t = load_file(shards[14])
    key = next(k for k in t if k.endswith(".latent"))
    t[key] = t[key].to(torch.int32)  # an integer latent
    save_file(t, shards[14])
    for s in shards[-2:]:  # the whole 2x8x8 bucket is unreadable
        open(s, "wb").write(b"broken")
    run_dir = d.fresh("damaged_data")
    job = Job(d, run_dir, f"data.paths=[{data}]", "data.max_bad_fraction=0.9", "data.max_batch_size=2",
              "logging.interval=2", steps=8)  # fmt: skip
    rc = job.finish()
    quarantined = sum(1 for _ in open(os.path.join(run_dir, "quarantine.jsonl"))) if rc == 0 else 0
    ok = rc == 0 and quarantined == 5
    return Outcome(ok, 0, f"rc {rc}, {quarantined} quarantined; " + line_with(job.output, "quarantined in"))


BAD_CONFIGS = [
    ("train.stepz=3", "stepz"), ("train.steps=abc", "train.steps"), ("watchdog.step_factor=0.5", "watchdog.step_factor"),
    ("train.max_restarts=-1", "train.max_restarts"), ("data.paths=[/nonexistent/ds]", "/nonexistent/ds"),
    ("parallel.tp=3", "parallel.tp"),
]


def bad_config(d: Drill, override: str, needle: str) -> Outcome:
    from tests.trainer_utils import overrides

    run_dir = d.fresh("bad_config")
    t0 = time.monotonic()
    out = d.cli("train", d.stage, "--nproc", "2", *overrides(run_dir, d.data, 5), override, timeout=120)
    took = time.monotonic() - t0
    ok = out.returncode == 2 and needle in out.stderr and not os.path.exists(run_dir)
    return Outcome(ok, 0, f"{took:.0f} s, nothing started: " + line_with(out.stderr, "config error"))


def bad_inputs(d: Drill) -> list[Outcome]:
    import torch

    from mugv.checkpoint.weights import write_weights_checkpoint
    from mugv.text import make_tiny_t5
    from tests.conftest import tiny_model
    from tests.test_sample_cli import SMALL_VAE

    root = d.fresh("bad_inputs")
    os.makedirs(root)
    model = tiny_model(seed=1).eval()
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["blocks.0.mlp.fc1.weight"][0, 0] = float("nan")
    nan_pt, cut_pt = os.path.join(root, "nan.pt"), os.path.join(root, "cut.pt")
    torch.save(sd, nan_pt)
    model.export_release(cut_pt)
    os.truncate(cut_pt, os.path.getsize(cut_pt) // 2)
    nan_ckpt = os.path.join(root, "nan_ckpt")
    write_weights_checkpoint(sd.__getitem__, model.config, nan_ckpt, {})
    good = os.path.join(root, "good_ckpt")
    model.export_release(os.path.join(root, "good.pt"))
    d.cli("convert", "from-hf", "--src", os.path.join(root, "good.pt"), "--out", good)
    _flip(sorted(glob.glob(os.path.join(good, "*.distcp")))[0])
    t5 = make_tiny_t5(os.path.join(root, "t5"), d_model=model.config.caption_channels, num_heads=2)
    from mugv.vae import VideoVAE, VideoVAEConfig

    torch.save(VideoVAE(VideoVAEConfig(**SMALL_VAE)).state_dict(), os.path.join(root, "vae.pt"))
    with open(os.path.join(root, "vae.json"), "w") as f:
        json.dump({"kind": "video_vae", "weights": "vae.pt", "config": SMALL_VAE}, f)
    sample = ["sample", "--t5", t5, "--vae", os.path.join(root, "vae.json"), "--prompt", "x", "--frames", "9",
              "--height", "32", "--width", "32", "--steps", "2"]  # fmt: skip
    cases = [
        (["convert", "from-hf", "--src", nan_pt, "--out", os.path.join(root, "o1")], "non-finite"),
        (["convert", "from-hf", "--src", cut_pt, "--out", os.path.join(root, "o2")], "cut.pt"),
        (["convert", "to-hf", "--ckpt", nan_ckpt, "--out", os.path.join(root, "o3")], "non-finite"),
        (["convert", "to-hf", "--ckpt", good, "--out", os.path.join(root, "o4")], "does not verify"),
        ([*sample, "--model", nan_ckpt, "--out", os.path.join(root, "o5.mp4")], "non-finite"),
        ([*sample, "--model", nan_pt, "--out", os.path.join(root, "o6.mp4")], "non-finite"),
    ]
    out = []
    for args, needle in cases:
        res = d.cli(*args)
        target = args[args.index("--out") + 1]
        err = res.stderr.strip().splitlines()[-1] if res.stderr.strip() else ""
        ok = res.returncode != 0 and needle in res.stderr and not os.path.exists(target)
        out.append(Outcome(ok, None, f"{args[0]} {args[1] if args[0] == 'convert' else ''}: {err[:100]}"))
    return out
