"""The fault drill's harness (tools/fault_drill.py): CLI training jobs, the processes of a run,
and an uninterrupted reference run to compare weights with."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FAULTS = os.path.join(REPO, "tools", "faults")
if REPO not in sys.path:
    sys.path.insert(0, REPO)
REF_STEPS = 40

from tests.trainer_utils import processes_of  # noqa: E402


@dataclass
class Outcome:
    survived: bool
    lost: int | None
    message: str


@dataclass
class Row:
    fault: str
    outcomes: list[Outcome] = field(default_factory=list)


class Job:
    """`mugv train --nproc 2` in a session of its own; output collected with arrival times."""

    def __init__(self, drill: Drill, run_dir: str, *extra: str, fault: str = "", steps: int = 100000):
        from tests.trainer_utils import overrides

        self.run_dir = run_dir
        cmd = [sys.executable, "-m", "mugv.cli.main", "train", drill.stage, "--nproc", "2",
               *overrides(run_dir, drill.data, steps), *extra]  # fmt: skip
        self.proc = subprocess.Popen(cmd, env=drill.env(fault), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, start_new_session=True, cwd=REPO)  # fmt: skip
        self.lines: list[tuple[float, str]] = []
        self.reader = threading.Thread(target=lambda: [self.lines.append((time.monotonic(), x)) for x in self.proc.stdout],
                                       daemon=True)  # fmt: skip
        self.reader.start()

    def wait_for(self, text: str, timeout: float = 300) -> float | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for t, line in list(self.lines):
                if text in line:
                    return t
            if self.proc.poll() is not None and not self.reader.is_alive():
                return None
            time.sleep(0.05)
        return None

    def finish(self, timeout: float = 600) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            kill_all(self.run_dir)
            rc = self.proc.wait(30)
        self.reader.join(30)
        return rc

    @property
    def output(self) -> str:
        return "".join(x for _, x in self.lines)

    def step_seen(self) -> int:
        """The last `step N/` the job logged."""
        steps = [int(x.split("step ", 1)[1].split("/", 1)[0]) for _, x in self.lines if "INFO r0] step " in x]
        return steps[-1] if steps else 0


def kill_all(run_dir: str) -> None:
    for pid in processes_of(run_dir):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def gone_within(run_dir: str, seconds: float) -> float | None:
    """Seconds until no process of the run is left (None: still there after `seconds`)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds:
        if not processes_of(run_dir):
            return time.monotonic() - t0
        time.sleep(0.1)
    return None


def latest_step(run_dir: str) -> int | None:
    from mugv.checkpoint import latest_checkpoint

    path = latest_checkpoint(os.path.join(run_dir, "checkpoints"))
    return int(path.rsplit("_", 1)[1]) if path else None


def line_with(text: str, *needles: str, width: int = 110) -> str:
    for line in text.splitlines():
        if any(n in line for n in needles):
            line = line.split("] ", 1)[-1] if line.startswith("[") and "] " in line else line
            return line.strip()[:width]
    return "(no such line)"


class Drill:
    def __init__(self, root: str, trials: int):
        from tests.trainer_utils import dataset

        self.root, self.trials = root, trials
        self.data = dataset(root)
        self.stage = os.path.join(root, "stage.yaml")
        with open(self.stage, "w") as f:
            f.write("{}\n")
        self._ref: str | None = None
        self._n = 0

    def env(self, fault: str = "") -> dict:
        env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "MASTER_PORT")}
        if fault:
            env.update(MUGV_FAULT=fault, PYTHONPATH=os.pathsep.join([FAULTS, REPO]))
        return env

    def fresh(self, name: str) -> str:
        self._n += 1
        return os.path.join(self.root, f"{self._n:02d}_{name}")

    def reference(self) -> str:
        """Checkpoints of an uninterrupted run after every step (in-process, 2 gloo ranks)."""
        if self._ref is None:
            from tests.dist_harness import run_distributed
            from tests.trainer_utils import overrides, train_worker

            run = os.path.join(self.root, "reference")
            ovr = overrides(run, self.data, REF_STEPS, "checkpoint.interval=1", f"checkpoint.keep_last={REF_STEPS}")
            run_distributed(train_worker, 2, ovr, timeout=1200)
            self._ref = os.path.join(run, "checkpoints")
        return self._ref

    def exact(self, run_dir: str, step: int | None) -> bool:
        """The run's checkpoint at `step` holds the reference's weights and EMA, bit for bit."""
        import torch

        from mugv.checkpoint.weights import load_release_weights

        if step is None or step > REF_STEPS:
            return False
        mine = os.path.join(run_dir, "checkpoints", f"step_{step:08d}")
        ref = os.path.join(self.reference(), f"step_{step:08d}")
        for ema in (False, True):
            a, b = load_release_weights(mine, ema)[1], load_release_weights(ref, ema)[1]
            if a.keys() != b.keys() or not all(torch.equal(a[k], b[k]) for k in a):
                return False
        return True

    def cli(self, *args: str, timeout: float = 600, fault: str = "") -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "mugv.cli.main", *args], capture_output=True, text=True,
                              timeout=timeout, cwd=REPO, env=self.env(fault))  # fmt: skip

    def resume_to(self, run_dir: str, steps: int, *extra: str) -> tuple[bool, str]:
        """Rerun to `steps`; whether it ends with the reference's weights, and its output."""
        job = Job(self, run_dir, *extra, steps=steps)
        rc = job.finish()
        return rc == 0 and self.exact(run_dir, steps), job.output
