"""Checkpoints, previews and failures at scale, measured per rank on gloo: each rank writes its
own share of the training state within a bounded host-memory overhead, a DP2 checkpoint loads at
TP2 / PP2 / DP1, a weights-only start reads 1/DP of the weights per rank at DP 1 / 2 / 4, previews
sample the live sharded model, and one failing rank ends the job."""

import os
import shutil
import signal
import subprocess
import sys
import time

import torch

from tests.dist_harness import run_distributed
from tests.trainer_utils import base_checkpoint, dataset, load_worker, overrides, train_worker
from tools.bench_checkpoint import run as bench_checkpoint

MB = 2**20


def test_dp2_each_rank_writes_its_own_share(tmp_path):
    results = bench_checkpoint(2, str(tmp_path), hidden=288, depth=4)  # ~6M params, 121 MB of state
    written = [r["bytes"] for r in results]
    assert all(r["exact"] for r in results)  # zeroed state comes back bit for bit
    assert max(written) <= 1.3 * min(written), written
    # nothing written twice or left out: 20 bytes per parameter (weights, main, 2 moments, EMA)
    assert abs(sum(written) - 20 * results[0]["params"]) <= 0.01 * sum(written), (written, results[0]["params"])
    print("written per rank", written, "params", results[0]["params"],
          "save/load extra MB", [(r["save_extra"] // MB, r["load_extra"] // MB) for r in results])
    for r in results:  # sampled RSS above the training baseline
        assert r["save_extra"] <= 1.5 * r["bytes"] + 32 * MB, r
        assert r["load_extra"] <= 1.5 * r["bytes"] + 32 * MB, r


def test_dp2_checkpoint_loads_at_tp2_pp2_and_dp1(tmp_path):
    data = dataset(str(tmp_path))
    run = str(tmp_path / "run")
    saved = run_distributed(train_worker, 2, overrides(run, data, 3), timeout=300)[0]["params"]
    for i, (world, layout) in enumerate([(2, ["parallel.tp=2"]), (2, ["parallel.pp=2", "train.microbatches=2"]),
                                         (1, [])]):
        copy = shutil.copytree(run, f"{run}_{i}")  # each layout resumes the same DP2 checkpoint
        results = run_distributed(load_worker, world, overrides(copy, data, 4, *layout), timeout=300)
        loaded = {}
        for r in results:
            assert r["start"] == 3 and r["step"] == 4, layout
            loaded.update(r["loaded"])
        assert loaded.keys() == saved.keys(), layout
        for k, v in saved.items():
            assert torch.equal(loaded[k], v), (layout, k)


def weights_start_worker(rank, world, ovr):
    """A start from train.init_from (weights only): the weights and the checkpoint bytes read."""
    from mugv.config import load_config
    from mugv.training.config import TrainConfig
    from mugv.training.trainer import Trainer
    from tests.trainer_utils import release_params
    from tools.bench_merged_init import bytes_read

    trainer = Trainer(load_config(TrainConfig, None, ovr))
    with bytes_read() as read:
        trainer.resume()
    return dict(weights=release_params(trainer), bytes=read["bytes"])


def test_a_weights_only_start_reads_one_dp_share_per_rank(tmp_path):
    """The weights every DP replica holds are read once over the replicas (each rank 1/DP of them,
    exchanged), and every rank ends with exactly the weights a single process loads."""
    data, base = dataset(str(tmp_path)), base_checkpoint(str(tmp_path))
    per_dp = {}
    for world in (1, 2, 4):
        ovr = overrides(str(tmp_path / f"dp{world}"), data, 1, f"train.init_from={base}")
        per_dp[world] = run_distributed(weights_start_worker, world, ovr, timeout=300)
    whole = per_dp[1][0]
    print("bytes read per rank:", {w: [r["bytes"] for r in rs] for w, rs in per_dp.items()})
    for world, results in per_dp.items():
        for r in results:
            assert r["weights"].keys() == whole["weights"].keys()
            assert all(torch.equal(r["weights"][k], v) for k, v in whole["weights"].items()), world
        assert sum(r["bytes"] for r in results) == whole["bytes"], world  # nothing read twice
        assert max(r["bytes"] for r in results) <= 1.25 * whole["bytes"] / world, world


def preview_worker(rank, world, ovr):
    import mugv.models.mugdit as mugdit
    from mugv.config import load_config
    from mugv.training.config import TrainConfig
    from mugv.training.trainer import Trainer

    def no_plain_model(*a, **k):
        raise AssertionError("a preview built a plain MUGDiT (a second copy of the model)")

    mugdit.MUGDiT.__init__ = no_plain_model
    trainer = Trainer(load_config(TrainConfig, None, ovr))
    trainer.run()
    return trainer.history


def test_preview_samples_the_live_model_at_tp2(tmp_path):
    from mugv.convert import to_hf
    from mugv.sampling import load_model, sample_latents
    from mugv.text import T5TextEncoder, make_tiny_t5

    data = dataset(str(tmp_path))
    t5 = make_tiny_t5(str(tmp_path / "t5"), d_model=32)
    run = tmp_path / "run"
    prompts = ["a red square", "a blue circle"]
    ovr = overrides(str(run), data, 4, "parallel.tp=2", "checkpoint.interval=4", "preview.interval=2",
                    f"preview.prompts=[{','.join(prompts)}]", f"preview.text_encoder={t5}",
                    "preview.latent_shape=[2,4,6]", "preview.sampler.num_steps=3")
    with_preview = run_distributed(preview_worker, 2, ovr, timeout=300)[0]
    without = run_distributed(train_worker, 2, overrides(str(tmp_path / "plain"), data, 4, "parallel.tp=2"),
                              timeout=300)[0]["history"]
    assert with_preview == without  # a preview leaves training exactly as it was
    assert sorted(os.listdir(run / "checkpoints")) == ["latest", "step_00000004"]  # none forced
    got = torch.load(run / "previews" / "step_00000004_latents.pt")
    assert os.path.isfile(run / "previews" / "step_00000002_latents.pt")
    to_hf(str(run), out=str(tmp_path / "hf"), ema=True)
    model = load_model(str(tmp_path / "hf"))
    from mugv.diffusion import SamplerConfig

    s = SamplerConfig()
    want = sample_latents(model, T5TextEncoder(t5), prompts, (2, 4, 6), negative_prompt=s.negative_prompt,
                          steps=3, guidance=s.guidance_scale, seed=4, fps=s.fps, prompt_suffix=s.prompt_suffix)
    assert got.shape == want.shape == (2, 24, 2, 4, 6)
    print(f"preview vs sampling the exported EMA: max abs diff {(got - want).abs().max():.3e} "
          f"(max |latent| {want.abs().max():.3f})")
    assert (got - want).abs().max() <= 1e-4 * want.abs().max(), (got - want).abs().max()


def test_one_failing_rank_ends_the_job(tmp_path):
    data = dataset(str(tmp_path))
    ovr = overrides(str(tmp_path / "run"), data, 50, "checkpoint.interval=0")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           os.path.join(os.path.dirname(__file__), "failing_train.py"), *ovr]
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=120)
    finally:  # a hung job (the failure this test guards against) must not outlive it
        subprocess.run(["pkill", "-9", "-f", f"run_dir={tmp_path}/run"], check=False)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    elapsed = time.monotonic() - t0
    print(f"one failing rank: the job ended in {elapsed:.1f} s with exit code {proc.returncode}")
    assert proc.returncode != 0, out[-3000:]
    assert "rank 1 failed: RuntimeError: injected failure in step 3" in out, out[-3000:]
    assert elapsed < 60, elapsed

