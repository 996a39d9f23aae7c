"""What a run resumes from and what a failure leaves behind, on 2 gloo ranks in-process: a corrupt
shard of the latest checkpoint is found by its checksum and the run resumes exactly from the one
before; a diverged run leaves `latest` at a healthy checkpoint; a micro-batch with no readable
sample never reaches the model. And the pieces: the run lock, checksums and `mugv checkpoint
verify`, pruning, the disk-full message, the global batch at another DP size."""

import errno
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from mugv.checkpoint import latest_checkpoint
from mugv.checkpoint.checkpointer import save_error
from mugv.checkpoint.integrity import verify
from mugv.checkpoint.locate import remove_checkpoint
from mugv.cli.main import main as cli
from mugv.data.synthetic import write_synthetic_dataset
from mugv.utils.runlock import LOCK_NAME, RunLock, RunLockError, check_free
from tests.dist_harness import DistributedRankError, run_distributed
from tests.trainer_utils import dataset, load_worker, overrides, train_worker


def flip_bytes(path: str, offset: int = 1000, n: int = 512) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(b"\xff" * n)


def logged_load_worker(rank, world, ovr):
    """load_worker, with the warnings and errors it logged."""
    import logging

    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = lambda r: records.append(r.getMessage())
    logging.getLogger("mugv").addHandler(handler)
    return {**load_worker(rank, world, ovr), "log": records}


def test_corrupt_latest_checkpoint_is_detected_and_the_one_before_resumes_exactly(tmp_path):
    data = dataset(str(tmp_path))
    full = run_distributed(train_worker, 2, overrides(str(tmp_path / "full"), data, 6), timeout=300)
    run = str(tmp_path / "run")
    run_distributed(train_worker, 2, overrides(run, data, 4, "checkpoint.interval=2"), timeout=300)
    ckpts = os.path.join(run, "checkpoints")
    assert verify(os.path.join(ckpts, "step_00000004"))[0] == []
    flip_bytes(os.path.join(ckpts, "step_00000004", "__1_0.distcp"))  # a shard rank 1 wrote
    results = run_distributed(logged_load_worker, 2, overrides(run, data, 6, "checkpoint.interval=2"), timeout=300)
    log = "\n".join(results[0]["log"])
    assert "step_00000004/__1_0.distcp: checksum" in log and "setting it aside" in log, log
    assert "step_00000002, the newest checkpoint that verifies" in log, log
    assert all(r["start"] == 2 and r["step"] == 6 for r in results)
    assert results[0]["history"] == full[0]["history"][2:]  # bit-identical from step 2 on
    assert os.path.isdir(os.path.join(ckpts, "step_00000004.corrupt"))
    assert latest_checkpoint(ckpts).endswith("step_00000006")


def test_verify_names_truncated_missing_and_garbage_files(tmp_path, capsys):
    data = dataset(str(tmp_path))
    run = str(tmp_path / "run")
    run_distributed(train_worker, 1, overrides(run, data, 1), timeout=300)
    ckpt = latest_checkpoint(os.path.join(run, "checkpoints"))
    assert cli(["checkpoint", "verify", run]) == 0
    assert "OK (" in capsys.readouterr().out
    with open(os.path.join(ckpt, ".metadata"), "r+b") as f:
        f.truncate(100)
    os.remove(os.path.join(ckpt, "__0_1.distcp"))
    with open(os.path.join(ckpt, "common.pt"), "wb") as f:
        f.write(b"garbage")
    assert cli(["checkpoint", "verify", run, "--all"]) == 1
    out = capsys.readouterr().out
    assert ".metadata: 100 bytes" in out and "__0_1.distcp: missing" in out and "common.pt: 7 bytes" in out, out


def test_divergence_leaves_latest_at_a_healthy_checkpoint(tmp_path):
    data = dataset(str(tmp_path))
    run = str(tmp_path / "run")
    run_distributed(train_worker, 2, overrides(run, data, 4, "checkpoint.interval=2"), timeout=300)
    # resumed at lr 1e4: the first update still has a finite loss but blows the weights up, then the
    # loss goes non-finite; a checkpoint is saved after every step and only the last 3 are kept
    # (pruning must not take the last healthy one)
    ovr = overrides(run, data, 12, "optim.lr=1e4", "checkpoint.interval=1", "checkpoint.keep_last=3",
                    "train.max_nonfinite_in_row=3")  # fmt: skip
    with pytest.raises(DistributedRankError, match="non-finite") as err:
        run_distributed(train_worker, 2, ovr, timeout=300)
    assert "optim.lr (now 10000)" in str(err.value)
    ckpts = os.path.join(run, "checkpoints")
    diverged = sorted(n for n in os.listdir(ckpts) if n.endswith(".diverged"))
    assert latest_checkpoint(ckpts).endswith("step_00000004"), (os.listdir(ckpts), str(err.value)[-2000:])
    assert diverged[0] == "step_00000005.diverged" and len(diverged) >= 3, diverged
    from mugv.checkpoint.weights import checkpoint_metadata, dist_session, read_full

    def biggest(path):  # largest |weight| (read directly: the readers refuse non-finite weights)
        with dist_session():
            meta = checkpoint_metadata(path)
            keys = [k for k in meta if k.startswith("model.")]
            return max(float(v.abs().max()) for k, v in read_full(path, keys, meta).items() if k in keys)

    assert biggest(latest_checkpoint(ckpts)) < 10 < 1000 < biggest(os.path.join(ckpts, diverged[0]))
    stopped = json.load(open(os.path.join(run, "stopped.json")))
    assert "step_00000004" in stopped["reason"] and "optim.lr" in stopped["reason"]


def _record_batch_sizes(rank, world, ovr):
    from mugv.config import load_config
    from mugv.training.config import TrainConfig
    from mugv.training.trainer import Trainer

    trainer = Trainer(load_config(TrainConfig, None, ovr))
    sizes, step = [], trainer.forward_step

    def forward_step(data_iterator, model):
        batch = next(data_iterator)
        sizes.append(len(batch))
        return step(iter([batch]), model)

    trainer.forward_step = forward_step
    trainer.run()
    return sizes, trainer.faults.skipped_steps, trainer.step, trainer.data.metrics()["data/bad_samples"]


def test_an_all_bad_micro_batch_never_reaches_the_model(tmp_path):
    data = str(tmp_path / "ds")
    write_synthetic_dataset(data, {(1, 4, 4): 16, (2, 4, 6): 2}, text_dim=32, text_len=8, shard_bytes=1)
    rows = [json.loads(x) for name in sorted(os.listdir(os.path.join(data, "manifest")))
            for x in open(os.path.join(data, "manifest", name))]  # fmt: skip
    videos = [r for r in rows if r["shape"][0] == 2]
    for r in videos:  # every sample of the video bucket is unreadable
        with open(os.path.join(data, r["file"]), "wb") as f:
            f.write(b"broken")
    run = str(tmp_path / "run")
    # micro-batches of 2: 8 of images and 1 of videos per epoch, so some steps draw the video one
    ovr = overrides(run, data, 6, "data.max_bad_fraction=1.0", "data.max_batch_size=2", "logging.interval=2")
    results = run_distributed(_record_batch_sizes, 2, ovr, timeout=300)
    for sizes, skipped, step, bad in results:
        assert min(sizes) >= 1 and step == 6
        assert skipped >= 1 and bad == len(videos)  # each bad sample counted once, over both ranks
    assert results[0][1] == results[1][1]  # the ranks skipped the same steps
    quarantined = [json.loads(x)["id"] for x in open(os.path.join(run, "quarantine.jsonl"))]
    assert sorted(quarantined) == sorted(r["id"] for r in videos)


def test_run_lock(tmp_path):
    run = str(tmp_path / "run")
    lock = RunLock(run, job="a")
    lock.acquire()
    info = json.load(open(os.path.join(run, LOCK_NAME)))
    assert info["pid"] == os.getpid() and info["host"] == socket.gethostname()
    other = subprocess.run([sys.executable, "-c", f"from mugv.utils.runlock import RunLock; RunLock({run!r}, 'b').acquire()"],
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    assert other.returncode != 0 and "RunLockError" in other.stderr and f"pid {os.getpid()}" in other.stderr
    with pytest.raises(RunLockError, match=f"host {socket.gethostname()}, pid {os.getpid()}, started 20"):
        check_free(run)
    lock.release()
    assert not os.path.exists(os.path.join(run, LOCK_NAME))
    check_free(run)
    # stale: a dead process on this host, or another host's lock whose heartbeat stopped
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    for stale in ({"host": socket.gethostname(), "pid": dead.pid, "started": time.time(), "heartbeat": time.time()},
                  {"host": "elsewhere", "pid": 1, "started": 0, "heartbeat": time.time() - 3600}):  # fmt: skip
        with open(os.path.join(run, LOCK_NAME), "w") as f:
            json.dump(stale, f)
        taker = RunLock(run, job="c")
        taker.acquire()  # taken over, saying so
        assert json.load(open(os.path.join(run, LOCK_NAME)))["pid"] == os.getpid()
        taker.release()
    with open(os.path.join(run, LOCK_NAME), "w") as f:
        json.dump({"host": "elsewhere", "pid": 1, "started": 0, "heartbeat": time.time(), "job": "j"}, f)
    with pytest.raises(RunLockError, match="host elsewhere"):
        RunLock(run, job="k").acquire()
    RunLock(run, job="j").acquire()  # an in-job restart that moved rank 0 takes its own job's lock


def test_pruning_removes_the_marker_first(tmp_path, monkeypatch):
    ckpt = tmp_path / "step_00000001"
    ckpt.mkdir()
    (ckpt / "complete.json").write_text("{}")
    (ckpt / "__0_0.distcp").write_bytes(b"x")

    def killed(*a, **k):
        raise KeyboardInterrupt  # the process dies while deleting the files

    monkeypatch.setattr(shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        remove_checkpoint(str(ckpt))
    assert not (ckpt / "complete.json").exists() and latest_checkpoint(str(tmp_path)) is None


def test_a_full_disk_says_so_and_names_the_path(tmp_path):
    root = tmp_path / "checkpoints"
    (root / "step_00000002").mkdir(parents=True)
    (root / "step_00000002" / "complete.json").write_text('{"step": 2}')
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as inner:
            raise RuntimeError("Worker failure: [enforce fail at inline_container.cc:672] unexpected pos") from inner
    except RuntimeError as err:
        message = str(save_error(err, str(root / "step_00000004.tmp"), str(root)))
    assert "the disk is full" in message and str(root / "step_00000004.tmp") in message
    assert f"the previous checkpoint {root / 'step_00000002'} is intact" in message


def test_global_batch_is_kept_or_said_to_change(caplog):
    from mugv.config import load_config
    from mugv.training.config import TrainConfig
    from mugv.training.recovery import microbatches_for

    cfg = load_config(TrainConfig, None, ["data.paths=[x]", "train.microbatches=1"])
    assert microbatches_for(cfg, 4, 2) == 2  # DP4 x 1 -> DP2 x 2
    with caplog.at_level("WARNING", logger="mugv"):
        assert microbatches_for(cfg, 1, 2) == 1  # TP2 -> DP2 cannot keep 1 micro-batch per step
    assert "global batch CHANGES" in caplog.text and "took 1 micro-batches per step, this run takes 2" in caplog.text
    cfg.train.keep_global_batch = False
    assert microbatches_for(cfg, 4, 2) == 1
