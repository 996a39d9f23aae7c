"""Fault drill: does to tiny 2-rank `mugv train --nproc 2` runs what schedulers, crashes, disks and
users do, end to end, and prints what survived.

    python tools/fault_drill.py [--only WORD ...] [--trials N] [--dir DIR] [--list]

Each scenario runs real CLI jobs (the trainer tests' synthetic data and debug model, faults
injected by tools/faults/sitecustomize.py) and prints one row: fault | trials | survived | steps
lost | message. *Survived* means the job ended the way it should (a clean stop and save, a clear
error naming the problem, a restart) AND the run could go on without a human: a rerun resumes
and, where training continued, ends with exactly the weights and EMA of an uninterrupted run
(compared with a reference run that saved every step). *Steps lost*: steps trained but not in
the checkpoint the run goes on from. *Message*: what the job said (the key line, shortened).

The disk-full scenario mounts a small tmpfs (needs root, or `unshare -rm`); without either it is
reported as not run. Takes ~20-40 min on 2 CPU cores; --only picks scenarios by name.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
FAULTS = os.path.join(REPO, "tools", "faults")
REF_STEPS = 16


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


def processes_of(run_dir: str) -> list[int]:
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if f"run_dir={run_dir}\0".encode() in f.read() + b"\0":
                        out.append(int(pid))
            except OSError:
                pass
    return out


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


# ---------------------------------------------------------------------------------------------
# scenarios
# ---------------------------------------------------------------------------------------------


def signal_scenario(how: str, sig: int):
    def run(d: Drill) -> Outcome:
        run_dir = d.fresh(how.replace(" ", "_"))
        job = Job(d, run_dir)
        job.wait_for("step 3/")
        at = job.step_seen()
        if how == "group":
            os.killpg(job.proc.pid, sig)
        elif how == "launcher":
            os.kill(job.proc.pid, sig)
        else:
            agent = [p for p in processes_of(run_dir) if b"mugv.parallel.agent" in open(f"/proc/{p}/cmdline", "rb").read()]
            workers = [p for p in processes_of(run_dir) if b"mugv.cli.main\0train" in open(f"/proc/{p}/cmdline", "rb").read()
                       and p != job.proc.pid]  # fmt: skip
            targets = {"agent": agent, "one rank": workers[-1:], "every process": processes_of(run_dir)}[how]
            for p in targets:
                os.kill(p, sig)
        t0 = time.monotonic()
        rc = job.finish()
        gone = gone_within(run_dir, 15)
        saved = latest_step(run_dir)
        ok = rc == 0 and saved is not None and saved >= at and gone is not None and d.exact(run_dir, saved)
        took = time.monotonic() - t0
        return Outcome(ok, None if saved is None else max(0, at - saved),
                       f"rc {rc}, saved step {saved} ({took:.0f} s); " + line_with(job.output, "stopping at step"))

    return run


def ctrl_c(d: Drill, twice: bool = False) -> Outcome:
    run_dir = d.fresh("ctrl_c2" if twice else "ctrl_c")
    job = Job(d, run_dir, "checkpoint.interval=2")
    job.wait_for("step 3/")
    at = job.step_seen()
    t0 = time.monotonic()
    os.killpg(job.proc.pid, signal.SIGINT)
    if twice:
        time.sleep(0.3)
        os.killpg(job.proc.pid, signal.SIGINT)
    rc = job.finish(timeout=120)
    gone = gone_within(run_dir, 30)
    total = time.monotonic() - t0
    saved = latest_step(run_dir)
    if twice:  # aborts at once: the last interval checkpoint is what is left
        ok = rc == 130 and gone is not None and total < 10 and saved is not None
        ok = ok and d.resume_to(run_dir, saved + 2)[0]
        return Outcome(ok, None if saved is None else at - saved, f"rc {rc}, all gone {total:.1f} s after the first")
    ok = rc == 0 and gone is not None and saved is not None and saved >= at and d.exact(run_dir, saved)
    return Outcome(ok, None if saved is None else max(0, at - saved),
                   f"rc {rc}, saved step {saved}, every process gone {total:.1f} s after Ctrl-C")


def kill_launcher_group(d: Drill) -> Outcome:
    run_dir = d.fresh("kill9_launcher")
    job = Job(d, run_dir)
    job.wait_for("step 3/")
    at = job.step_seen()
    t0 = time.monotonic()
    os.killpg(job.proc.pid, signal.SIGKILL)  # the agent runs in a session of its own
    job.finish()
    gone = gone_within(run_dir, 120)
    saved = latest_step(run_dir)
    ok = gone is not None and saved is not None and saved >= at and d.exact(run_dir, saved)
    return Outcome(ok, None if saved is None else max(0, at - saved),
                   f"ranks saved step {saved} and were gone {time.monotonic() - t0:.0f} s after; "
                   + line_with(job.output, "the launcher is gone"))


def kill_agent(d: Drill) -> Outcome:
    run_dir = d.fresh("kill9_agent")
    job = Job(d, run_dir)
    job.wait_for("step 3/")
    at = job.step_seen()
    for p in processes_of(run_dir):
        if b"mugv.parallel.agent" in open(f"/proc/{p}/cmdline", "rb").read():
            os.kill(p, signal.SIGKILL)
    job.finish()
    gone = gone_within(run_dir, 150)
    saved = latest_step(run_dir)
    ok = gone is not None and saved is not None and saved >= at and d.exact(run_dir, saved)
    return Outcome(ok, None if saved is None else max(0, at - saved),
                   f"ranks saved step {saved}; " + line_with(job.output, "launcher is gone"))


def kill_rank(d: Drill, restarts: int) -> Outcome:
    run_dir = d.fresh(f"kill9_rank_r{restarts}")
    steps = 8
    job = Job(d, run_dir, "checkpoint.interval=2", f"train.max_restarts={restarts}", steps=steps,
              fault="kill:rank=1:step=5")  # fmt: skip
    rc = job.finish()
    lost = 5 - 4
    if restarts:
        ok = rc == 0 and d.exact(run_dir, steps) and "resumed from" in job.output
        return Outcome(ok, lost, f"rc {rc}; " + line_with(job.output, "resumed from"))
    resumed, out = d.resume_to(run_dir, steps)
    ok = rc != 0 and not processes_of(run_dir) and resumed
    return Outcome(ok, lost, f"rc {rc}, rerun: " + line_with(out, "resumed from"))


def kill_in_save(d: Drill, what: str) -> Outcome:
    run_dir = d.fresh(what)
    extra = ["checkpoint.interval=2"] + (["checkpoint.keep_last=1"] if what == "killprune" else [])
    job = Job(d, run_dir, *extra, steps=8, fault=f"{what}:rank=0:step=4")
    rc = job.finish()
    left = latest_step(run_dir)
    resumed, out = d.resume_to(run_dir, 8, *extra)
    ok = rc != 0 and resumed and left is not None
    return Outcome(ok, 4 - left if left is not None else None,
                   f"latest after the kill: step {left}; rerun: " + line_with(out, "resumed from"))


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


def hang(d: Drill) -> Outcome:
    run_dir = d.fresh("hang")
    job = Job(d, run_dir, "watchdog.min_step_s=5", "watchdog.step_factor=5", fault="sleep:rank=1:step=4:seconds=900")
    t0 = job.wait_for("[fault]") or time.monotonic()
    rc = job.finish(timeout=300)
    took = time.monotonic() - t0
    out = job.output
    ok = rc != 0 and took < 60 and "slowest rank(s) [1]" in out and out.count("Python stacks at the abort") == 2
    return Outcome(ok, 4, f"ended {took:.0f} s after the hang; " + line_with(out, "hang: step"))


def divergence(d: Drill) -> Outcome:
    run_dir = d.fresh("divergence")
    Job(d, run_dir, "checkpoint.interval=2", steps=4).finish()
    job = Job(d, run_dir, "optim.lr=1e4", "checkpoint.interval=1", "train.max_nonfinite_in_row=3", steps=12)
    rc = job.finish()
    left = latest_step(run_dir)
    resumed, out = d.resume_to(run_dir, 8)  # back at the healthy checkpoint with the right lr
    ok = rc != 0 and left == 4 and resumed
    said = line_with(job.output, "went non-finite", width=100000)
    said = said[said.find("The loss first"):][:140]
    return Outcome(ok, None, f"latest: step {left}; {said}")


def two_runs(d: Drill, together: bool) -> Outcome:
    run_dir = d.fresh("two_runs")
    # apart: the first run pauses 60 s in its third step (holding the directory) while the second starts
    first = Job(d, run_dir, "checkpoint.interval=4", steps=8, fault="" if together else "sleep:rank=0:step=2:seconds=60")
    if not together:
        first.wait_for("[fault]")
    second = Job(d, run_dir, "checkpoint.interval=4", steps=8)
    rcs = sorted([first.finish(), second.finish()])
    out = first.output + second.output
    ok = rcs[0] == 0 and rcs[1] != 0 and "in use by another run" in out and d.exact(run_dir, 8)
    return Outcome(ok, 0, f"exit codes {rcs}; " + line_with(out, "in use by another run", width=150))


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


SCENARIOS = {
    "SIGTERM to the process group": lambda d: signal_scenario("group", signal.SIGTERM)(d),
    "SIGTERM to the launcher alone": lambda d: signal_scenario("launcher", signal.SIGTERM)(d),
    "SIGTERM to torchrun (agent) alone": lambda d: signal_scenario("agent", signal.SIGTERM)(d),
    "SIGTERM to one rank": lambda d: signal_scenario("one rank", signal.SIGTERM)(d),
    "SIGTERM to every process (Slurm cgroup)": lambda d: signal_scenario("every process", signal.SIGTERM)(d),
    "SIGUSR1 to the process group": lambda d: signal_scenario("group", signal.SIGUSR1)(d),
    "SIGINT (Ctrl-C) to the process group": ctrl_c,
    "SIGINT twice": lambda d: ctrl_c(d, twice=True),
    "kill -9 of the launcher's group": kill_launcher_group,
    "kill -9 of torchrun (agent)": kill_agent,
    "kill -9 of a rank, no restarts": lambda d: kill_rank(d, 0),
    "kill -9 of a rank, train.max_restarts=1": lambda d: kill_rank(d, 1),
    "kill -9 of rank 0 in a save": lambda d: kill_in_save(d, "killsave"),
    "kill -9 of rank 0 while pruning": lambda d: kill_in_save(d, "killprune"),
    **{f"corrupt checkpoint: {k}": (lambda d, k=k: corrupt(d, k)) for k in CORRUPTIONS},
    "disk full in a save (10 MB tmpfs)": disk_full,
    "damaged data (missing, truncated, int32, a dead bucket)": damaged_data,
    **{f"bad config: {o}": (lambda d, o=o, n=n: bad_config(d, o, n)) for o, n in BAD_CONFIGS},
    "a rank hangs in a step": hang,
    "divergence (resumed at optim.lr=1e4)": divergence,
    "two runs on one directory, second later": lambda d: two_runs(d, False),
    "two runs on one directory, started together": lambda d: two_runs(d, True),
    "bad convert / sample inputs": bad_inputs,
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", default=[], help="run scenarios whose name contains one of these")
    ap.add_argument("--trials", type=int, default=1, help="trials per scenario")
    ap.add_argument("--dir", default="", help="work directory (default: a temporary one, removed after)")
    ap.add_argument("--list", action="store_true", help="list the scenarios")
    args = ap.parse_args()
    names = [n for n in SCENARIOS if not args.only or any(w.lower() in n.lower() for w in args.only)]
    if args.list:
        print("\n".join(names))
        return 0
    root = args.dir or tempfile.mkdtemp(prefix="fault_drill_")
    drill = Drill(root, args.trials)
    rows = []
    try:
        for name in names:
            row = Row(name)
            for _ in range(args.trials):
                t0 = time.monotonic()
                try:
                    got = SCENARIOS[name](drill)
                except Exception as err:  # noqa: BLE001 - a scenario that breaks is a row, not the end
                    got = Outcome(False, None, f"drill error: {type(err).__name__}: {err}"[:150])
                got = got if isinstance(got, list) else [got]
                row.outcomes += got
                for o in got:
                    print(f"  {name}: {o.survived} ({time.monotonic() - t0:.0f} s) {o.message}", flush=True)
            rows.append(row)
    finally:
        for pids in (processes_of(root),):
            for p in pids:
                os.kill(p, signal.SIGKILL)
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    print(f"\n| {'fault':<55} | trials | survived | steps lost | message |\n|{'-' * 57}|--------|----------|------------|---------|")
    for row in rows:
        lost = sorted({o.lost for o in row.outcomes if o.lost is not None})
        lost_s = "-" if not lost else ",".join(map(str, lost))
        survived = sum(o.survived for o in row.outcomes)
        print(f"| {row.fault:<55} | {len(row.outcomes):>6} | {survived:>8} | {lost_s:>10} | {row.outcomes[-1].message} |")
    return 0 if all(o.survived for r in rows for o in r.outcomes) else 1


if __name__ == "__main__":
    sys.exit(main())
