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
import os
import shutil
import signal
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [REPO, os.path.join(REPO, "tools", "faults")]

from drill_harness import Drill, Job, Outcome, Row, gone_within, latest_step, line_with, processes_of  # noqa: E402
from drill_inputs import BAD_CONFIGS, CORRUPTIONS, bad_config, bad_inputs, corrupt, damaged_data, disk_full  # noqa: E402

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
        return Outcome(ok, None if saved is None else max(0, at - saved), f"rc {rc}, all gone {total:.1f} s after the first")
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
    # the save of step 4 dies before it is published; the pruning at step 6 (of step 2: keep_last=1,
    # and step 4 stays as the newest checkpoint known healthy) dies after the marker went
    extra = ["checkpoint.interval=2"] + (["checkpoint.keep_last=1"] if what == "killprune" else [])
    at = 4 if what == "killsave" else 6
    job = Job(d, run_dir, *extra, steps=8, fault=f"{what}:rank=0:step={at}")
    rc = job.finish()
    left = latest_step(run_dir)
    resumed, out = d.resume_to(run_dir, 8, *extra)
    ok = rc != 0 and resumed and left is not None and "[fault]" in job.output
    return Outcome(ok, at - left if left is not None else None,
                   f"latest after the kill: step {left}; rerun: " + line_with(out, "resumed from"))


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
