"""The training loop end to end on CPU + gloo: learning, exact and resharded resume, interrupted
saves, pre-emption, EMA and FLOPs accounting."""

import math
import os
import signal
import subprocess
import sys

import pytest
import torch

from mugv.checkpoint import latest_checkpoint
from tests.dist_harness import DistributedRankError, run_distributed
from tests.trainer_utils import assert_resume_is_exact, dataset, load_worker, overrides, train_worker


def overfit_worker(rank, world, ovr, steps):
    from mugv.config import load_config
    from mugv.training.config import TrainConfig
    from mugv.training.trainer import Trainer

    trainer = Trainer(load_config(TrainConfig, None, ovr))
    batch = next(iter(trainer.data))  # the same micro-batch, noise and timesteps every step
    losses = []
    for _ in range(steps):
        losses.append(trainer.train_step([batch])["loss"])
        trainer.step += 1
    return losses


def test_overfits_a_fixed_batch(tmp_path):
    data = dataset(str(tmp_path))
    ovr = overrides(str(tmp_path / "run"), data, 100, "optim.lr=3e-3", "train.text_dropout=0", "ema.decay=0")
    (h,) = run_distributed(overfit_worker, 1, ovr, 100, timeout=300)
    assert h[-1] <= h[0] / 10, f"loss {h[0]:.3f} -> {h[-1]:.3f}"


@pytest.mark.parametrize("layout", [
    ["parallel.overlap_grad_reduce=true", "parallel.bucket_size=4000"],
    ["parallel.bf16=true", "parallel.distributed_optimizer=false"],
    ["data.packing=true", "train.microbatches=2"],
], ids=["distopt_overlap_many_buckets", "bf16_replicated_optimizer", "packed"])
def test_resume_is_exact(tmp_path, layout):
    """DP2: the distributed optimizer with overlapped grad reduce and many small grad buckets;
    the replicated mixed-precision optimizer (every DP rank holds each slice, the fully parallel
    save writes it once, a resume reads the fp32 main params back into every rank); packed
    micro-batches of images and clips (the packed sampler's state, the model's packed path)."""
    assert_resume_is_exact(str(tmp_path), dataset(str(tmp_path)), 12, *layout)


def test_resharded_resume(tmp_path):
    data = dataset(str(tmp_path))
    run = str(tmp_path / "run")
    saved = run_distributed(train_worker, 2, overrides(run, data, 3, "parallel.tp=2"), timeout=300)[0]["params"]
    for world, layout in [(1, []), (2, ["parallel.pp=2", "train.microbatches=2"])]:
        results = run_distributed(load_worker, world, overrides(run, data, 5, *layout), timeout=300)
        loaded = {}
        for r in results:
            assert r["start"] == 3
            loaded.update(r["loaded"])
        assert set(loaded) == set(saved)
        for k, v in saved.items():
            assert torch.equal(loaded[k], v), k
        assert max(r["step"] for r in results) == 5
        # the TP1 run continued to step 5 and saved: move the PP2 run back to the TP2 checkpoint
        ckpts = os.path.join(run, "checkpoints")
        with open(os.path.join(ckpts, "latest"), "w") as f:
            f.write("step_00000003")


def test_interrupted_save_keeps_last_good_checkpoint(tmp_path):
    data = dataset(str(tmp_path))
    run = str(tmp_path / "run")
    ovr = overrides(run, data, 6, "checkpoint.interval=2")
    with pytest.raises(DistributedRankError, match="exited with code 17"):
        run_distributed(train_worker, 1, ovr, 4, timeout=300)
    ckpts = os.path.join(run, "checkpoints")
    assert os.path.isdir(os.path.join(ckpts, "step_00000004.tmp"))  # the shards were written ...
    assert latest_checkpoint(ckpts).endswith("step_00000002")  # ... but never published
    (r,) = run_distributed(load_worker, 1, ovr, timeout=300)
    assert r["start"] == 2 and r["step"] == 6
    assert latest_checkpoint(ckpts).endswith("step_00000006")


def test_sigterm_saves_and_exits_cleanly(tmp_path):
    data = dataset(str(tmp_path))
    run = str(tmp_path / "run")
    cfg = tmp_path / "stage.yaml"
    cfg.write_text("{}\n")
    cmd = [sys.executable, "-m", "mugv.cli.main", "train", str(cfg), *overrides(run, data, 100000)]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "MASTER_PORT")}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if "step 3/" in line:
            proc.send_signal(signal.SIGTERM)
            break
    out = "".join(seen) + proc.communicate(timeout=120)[0]
    assert proc.returncode == 0, out[-3000:]
    path = latest_checkpoint(os.path.join(run, "checkpoints"))
    assert path is not None, out[-3000:]
    stopped = int(path.rsplit("_", 1)[1])
    assert 3 <= stopped < 100000
    (r,) = run_distributed(load_worker, 1, overrides(run, data, stopped + 2), timeout=300)
    assert r["start"] == stopped and r["step"] == stopped + 2


def ema_worker(rank, world, ovr, decay):
    from mugv.config import load_config
    from mugv.training.config import TrainConfig
    from mugv.training.trainer import Trainer
    from tests.trainer_utils import release_params

    trainer = Trainer(load_config(TrainConfig, None, ovr))
    expected = {k: v.clone() for k, v in release_params(trainer).items()}
    data = iter(trainer.data)
    for _ in range(4):
        trainer.train_step([next(data)])
        trainer.step += 1
        for k, v in release_params(trainer).items():
            expected[k] = decay * expected[k] + (1 - decay) * v
    # the EMA swapped into the weights (as previews do), mapped to the release layout through
    # the same TP gather as the weights; swapping back restores the weights exactly
    from mugv.checkpoint.checkpointer import weights_from_main_params

    weights = release_params(trainer)
    trainer.ema.swap_into_main_params()
    weights_from_main_params(trainer.model, trainer.optimizer)
    got = release_params(trainer)
    trainer.ema.swap_into_main_params()
    weights_from_main_params(trainer.model, trainer.optimizer)
    assert all(torch.equal(v, weights[k]) for k, v in release_params(trainer).items())
    return max(float((got[k] - expected[k]).abs().max() / expected[k].abs().max()) for k in expected)


def test_ema_matches_hand_computed_trajectory(tmp_path):
    data = dataset(str(tmp_path))
    ovr = overrides(str(tmp_path / "run"), data, 4, "ema.decay=0.7", "parallel.tp=2")
    errs = run_distributed(ema_worker, 4, ovr, 0.7, timeout=300)  # TP2 x DP2, distributed optimizer
    assert max(errs) < 1e-6, errs


def test_logged_flops_ignore_recompute(tmp_path):
    data = dataset(str(tmp_path))
    logs = {}
    for mode in ["null", "full"]:
        ovr = overrides(str(tmp_path / mode), data, 4, f"parallel.recompute={mode}", "logging.interval=4")
        (r,) = run_distributed(train_worker, 1, ovr, timeout=300)
        logs[mode] = [v for v in r["logged"] if v][-1]
    flops = {m: v["perf/model_tflop_per_step"] for m, v in logs.items()}
    assert flops["null"] > 0 and math.isclose(flops["null"], flops["full"], rel_tol=1e-9), flops


def test_async_save_publishes_and_resumes(tmp_path):
    data = dataset(str(tmp_path))
    run = str(tmp_path / "run")
    ovr = ["checkpoint.async_save=true", "checkpoint.interval=2"]
    (r,) = run_distributed(train_worker, 1, overrides(run, data, 4, *ovr), timeout=300)
    ckpts = os.path.join(run, "checkpoints")
    assert sorted(n for n in os.listdir(ckpts) if n.startswith("step_")) == ["step_00000002", "step_00000004"]
    # the background writer checksummed the shards it wrote; the marker has them all
    from mugv.checkpoint.integrity import recorded, verify

    files = recorded(os.path.join(ckpts, "step_00000004"))
    assert sorted(n for n in files if n.endswith(".distcp")) == sorted(
        n for n in os.listdir(os.path.join(ckpts, "step_00000004")) if n.endswith(".distcp"))
    assert verify(os.path.join(ckpts, "step_00000004"))[0] == []
    (r2,) = run_distributed(load_worker, 1, overrides(run, data, 5, *ovr), timeout=300)
    assert r2["start"] == 4
    for k, v in r["params"].items():
        assert torch.equal(r2["loaded"][k], v), k
