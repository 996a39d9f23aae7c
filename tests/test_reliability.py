"""Reliability of `mugv train --nproc 2` (2 gloo ranks) treated as a scheduler and a hostile host
would: signals to the process group and to the launcher alone save the current step and resume
bit-identically, Ctrl-C leaves no process behind, a second run on the same directory is refused,
a rank that hangs ends the job with every stack dumped and the slow rank named, a worker killed
with SIGKILL is restarted and finishes with the weights of an uninterrupted run. Faults are
injected into unmodified runs by tools/faults/sitecustomize.py. Longer scenarios (disk full,
corrupt files, kill -9 at other moments) are in tools/fault_drill.py."""

import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from mugv.checkpoint import latest_checkpoint
from mugv.checkpoint.weights import load_release_weights
from tests.dist_harness import run_distributed
from tests.trainer_utils import dataset, overrides, processes_of, train_worker

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAULTS = os.path.join(REPO, "tools", "faults")
REFERENCE_STEPS = 20


class Run:
    """`mugv train --nproc 2` in a session of its own, its output collected with arrival times."""

    def __init__(self, tmp_path, run_dir, data, *extra, fault=""):
        cfg = tmp_path / "stage.yaml"
        cfg.write_text("{}\n")
        self.run_dir = run_dir
        cmd = [sys.executable, "-m", "mugv.cli.main", "train", str(cfg), "--nproc", "2",
               *overrides(run_dir, data, 100000), *extra]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "MASTER_PORT")}
        if fault:
            env.update(MUGV_FAULT=fault, PYTHONPATH=os.pathsep.join([FAULTS, REPO]))
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True, cwd=REPO)  # fmt: skip
        self.lines: list[tuple[float, str]] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line))

    def wait_for(self, text: str, timeout: float = 300) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for t, line in list(self.lines):
                if text in line:
                    return t
            if self.proc.poll() is not None and not self._reader.is_alive():
                break
            time.sleep(0.05)
        raise AssertionError(f"{text!r} not seen:\n{self.output[-4000:]}")

    def finish(self, timeout: float = 300) -> int:
        rc = self.proc.wait(timeout)
        self._reader.join(30)
        return rc

    @property
    def output(self) -> str:
        return "".join(line for _, line in self.lines)


def ranks_of(run_dir: str) -> list[int]:
    """The training processes (torchrun starts them as `python -u -m mugv.cli.main train ...`)."""
    out = []
    for pid in processes_of(run_dir):
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if b"-u\0-m\0mugv.cli.main\0train" in f.read():
                out.append(pid)
    return out


@pytest.fixture()
def no_leftovers(tmp_path):
    """After the test, kill (by pid) anything of its runs that is still alive."""
    yield
    for pid in processes_of(str(tmp_path), below=True):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted in-process 2-rank run with a checkpoint after every step."""
    root = tmp_path_factory.mktemp("reference")
    data = dataset(str(root))
    run = str(root / "run")
    ovr = overrides(run, data, REFERENCE_STEPS, "checkpoint.interval=1", f"checkpoint.keep_last={REFERENCE_STEPS}")
    run_distributed(train_worker, 2, ovr, timeout=600)
    return data, os.path.join(run, "checkpoints")


def weights(ckpt: str) -> dict[str, torch.Tensor]:
    _, model = load_release_weights(ckpt)
    _, ema = load_release_weights(ckpt, ema=True)
    return {**model, **{"ema." + k: v for k, v in ema.items()}}


def assert_same_weights(ckpt: str, ref: str) -> None:
    got, want = weights(ckpt), weights(ref)
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert torch.equal(got[k], v), (ckpt, k)


def stopped_step(run_dir: str) -> int:
    return int(latest_checkpoint(os.path.join(run_dir, "checkpoints")).rsplit("_", 1)[1])


def test_sigterm_to_group_and_launcher_save_the_step_and_resume_exactly(tmp_path, reference, no_leftovers):
    data, ref = reference
    run = str(tmp_path / "run")
    first = Run(tmp_path, run, data)
    first.wait_for("step 3/")
    ranks = ranks_of(run)
    for pid in ranks:  # hold the run still (its lock stays held) while a second run tries the directory
        os.kill(pid, signal.SIGSTOP)
    try:  # a second run on the same directory is refused, naming the holder, before anything starts
        second = subprocess.run([sys.executable, "-m", "mugv.cli.main", "train", str(tmp_path / "stage.yaml"),
                                 "--nproc", "2", *overrides(run, data, 5)], capture_output=True, text=True,
                                timeout=300, cwd=REPO)  # fmt: skip
    finally:
        for pid in ranks:
            os.kill(pid, signal.SIGCONT)
    assert second.returncode == 2, second.stderr[-3000:]
    assert "is in use by another run: host" in second.stderr and ", pid " in second.stderr, second.stderr[-3000:]
    assert ", started 20" in second.stderr, second.stderr[-3000:]
    os.killpg(first.proc.pid, signal.SIGTERM)  # what scancel / pre-emption do
    assert first.finish() == 0, first.output[-4000:]
    s1 = stopped_step(run)
    assert 3 <= s1 <= REFERENCE_STEPS - 4 and "stopping at step" in first.output
    assert not processes_of(run)

    again = Run(tmp_path, run, data)  # resumes from s1
    again.wait_for(f"resumed from {os.path.join(run, 'checkpoints', f'step_{s1:08d}')}")
    again.wait_for(f"step {s1 + 2}/")
    os.kill(again.proc.pid, signal.SIGTERM)  # the launcher alone
    assert again.finish() == 0, again.output[-4000:]
    s2 = stopped_step(run)
    assert s1 + 2 <= s2 <= REFERENCE_STEPS, s2
    print(f"SIGTERM to the group: saved step {s1}; to the launcher: saved step {s2}")
    for s in (s1, s2):  # the saved steps hold exactly the uninterrupted run's weights and EMA
        assert_same_weights(os.path.join(run, "checkpoints", f"step_{s:08d}"), os.path.join(ref, f"step_{s:08d}"))


def test_sigint_leaves_no_process_behind(tmp_path, no_leftovers):
    data = dataset(str(tmp_path))
    run = str(tmp_path / "run")
    job = Run(tmp_path, run, data)
    job.wait_for("step 2/")
    t0 = time.monotonic()
    os.killpg(job.proc.pid, signal.SIGINT)  # Ctrl-C: the terminal's process group
    rc = job.finish(timeout=120)
    gone = time.monotonic() - t0
    while processes_of(run) and time.monotonic() - t0 < 60:
        time.sleep(0.1)
    all_gone = time.monotonic() - t0
    print(f"Ctrl-C: launcher exited after {gone:.1f} s, every process gone after {all_gone:.1f} s")
    assert rc == 0 and "stopping at step" in job.output, job.output[-4000:]  # the first Ctrl-C saves and stops
    assert latest_checkpoint(os.path.join(run, "checkpoints")) is not None
    assert not processes_of(run)
    assert all_gone - gone < 1.0  # nothing outlives the launcher
    assert all_gone < 10, all_gone


def test_a_hung_rank_fails_the_job_with_stacks_and_names_it(tmp_path, no_leftovers):
    data = dataset(str(tmp_path))
    run = str(tmp_path / "run")
    job = Run(tmp_path, run, data, "watchdog.min_step_s=3", "watchdog.step_factor=5",
              fault="sleep:rank=1:step=4:seconds=600")  # fmt: skip
    t0 = job.wait_for("[fault] rank 1 step 4")
    rc = job.finish(timeout=300)
    took = time.monotonic() - t0
    out = job.output
    print(f"hang detected and the job ended {took:.1f} s after rank 1 started sleeping")
    assert rc != 0 and took < 30, (rc, took, out[-4000:])
    assert "hang: step 5 has run" in out and "slowest rank(s) [1]" in out, out[-4000:]
    for rank in (0, 1):  # every rank dumped its threads' Python stacks (faulthandler)
        assert f"[rank {rank}] Python stacks at the abort:" in out, out[-4000:]
    assert "in train_step" in out and "sitecustomize.py" in out  # rank 1's stack shows where it sleeps
    assert not processes_of(run)


def test_a_killed_worker_is_restarted_and_finishes_like_an_uninterrupted_run(tmp_path, reference, no_leftovers):
    data, ref = reference
    run = str(tmp_path / "run")
    steps = 8
    cfg = tmp_path / "stage.yaml"
    job = Run(tmp_path, run, data, f"train.steps={steps}", "checkpoint.interval=2", "train.max_restarts=1",
              fault="kill:rank=1:step=5")  # fmt: skip
    assert job.finish(timeout=600) == 0, job.output[-4000:]
    assert cfg.exists() and "[fault] rank 1 step 5 attempt 0: kill" in job.output
    assert f"resumed from {os.path.join(run, 'checkpoints', 'step_00000004')}" in job.output, job.output[-4000:]
    assert_same_weights(os.path.join(run, "checkpoints", f"step_{steps:08d}"), os.path.join(ref, f"step_{steps:08d}"))
