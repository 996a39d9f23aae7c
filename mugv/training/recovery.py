"""What a run resumes from, and what a failed run leaves for the next one.

  * `resume_candidates(root)`: the checkpoints to try, newest first from `latest`. The trainer
    loads the first that verifies; one that does not is set aside as `<name>.corrupt` (the log
    names its bad files) and the one before it is tried.
  * `last_healthy_step(losses, start, first_bad)`: after a divergence (DivergenceError), the last
    state the run can go back to: before the non-finite streak, and before the finite-but-exploding
    steps that usually precede it (a loss above SPIKE x the median of the WINDOW steps before it:
    the update that blew the weights up had a finite loss; `abnormal`). While training, the trainer
    tells the checkpointer the newest state whose loss was normal, and pruning keeps the newest
    checkpoint up to it, so a divergence longer than checkpoint.keep_last saves cannot prune the
    last healthy one. `keep_healthy(root, step, cfg)` sets
    the checkpoints after it aside as `<name>.diverged`, points `latest` at the newest one left and
    returns what to change to resume.
  * `StopMarker`: a stop that a restart would only repeat (a divergence, too much bad data) is
    written to `<run_dir>/stopped.json`; an in-job restart (train.max_restarts) of the same job
    finds it and ends at once instead of diverging again. A new job ignores an old marker.
  * `microbatches_for(cfg, saved_global, dp)`: the micro-batch count that keeps the global batch
    when a run resumes at another data-parallel size.
"""

from __future__ import annotations

import json
import math
import os

from mugv.checkpoint.locate import (
    is_complete,
    latest_checkpoint,
    set_aside,
    step_dirs,
    step_of,
    write_latest,
)
from mugv.utils.checkpoint_io import write_json_atomic
from mugv.utils.logging import get_logger
from mugv.utils.runlock import job_id

log = get_logger("train")
STOPPED = "stopped.json"
SPIKE, WINDOW = 10.0, 20


def abnormal(loss: float, before: list[float]) -> bool:
    """A non-finite loss, or one above SPIKE x the median of the (finite) losses `before` it (the
    last WINDOW are looked at; with fewer than 3 known, only non-finite counts)."""
    if not math.isfinite(loss):
        return True
    known = sorted(x for x in before[-WINDOW:] if math.isfinite(x))
    return len(known) >= 3 and loss > SPIKE * abs(known[len(known) // 2])


def last_healthy_step(losses: list[float], start: int, first_bad: int) -> int:
    """The newest state (step count) whose loss was normal: losses[i] is the loss of the state after
    start + i updates (this process's run), first_bad the first non-finite one. States before
    `start` are taken as healthy (the run resumed from one)."""
    s = first_bad - 1
    while s > start and s - start < len(losses) and abnormal(losses[s - start], losses[: s - start]):
        s -= 1
    return s


def resume_candidates(root: str) -> list[str]:
    """Complete checkpoints to resume from, best first: `latest`, then the older ones."""
    first = latest_checkpoint(root)
    if first is None:
        return []
    older = [n for n in step_dirs(root) if step_of(n) < step_of(first) and is_complete(os.path.join(root, n))]
    return [first, *(os.path.join(root, n) for n in reversed(older))]


def keep_healthy(root: str, healthy_step: int, first_bad: int, cfg) -> str:
    """Set aside the checkpoints saved after `healthy_step`; point `latest` at the newest one left.
    Returns the message that says where a rerun resumes and what to change. Rank 0."""
    diverged = [n for n in step_dirs(root) if step_of(n) > healthy_step]
    for name in diverged:
        set_aside(os.path.join(root, name), "diverged")
    healthy = latest_checkpoint(root) if not diverged else _newest_complete(root)
    write_latest(root, os.path.basename(healthy) if healthy else None)
    aside = f" Checkpoints saved since hold the diverged state: {', '.join(diverged)} renamed *.diverged." if diverged else ""
    start = (f"the run's latest checkpoint is {healthy} (step {step_of(healthy)}), saved before it" if healthy else
             "no checkpoint was saved before it: a rerun starts from "
             + (f"train.init_from ({cfg.train.init_from})" if cfg.train.init_from else "scratch"))  # fmt: skip
    o = cfg.optim
    return (
        f"The loss first went non-finite after {first_bad} updates (the last normal loss: after {healthy_step}); "
        f"{start}.{aside} To resume, change what "
        f"diverged -- e.g. a lower optim.lr (now {o.lr:g}), a longer optim.warmup_steps (now {o.warmup_steps}) "
        f"or optim.clip_grad (now {o.clip_grad:g}), or remove the samples named above -- and run the same "
        "command again."
    )


def _newest_complete(root: str) -> str | None:
    complete = [n for n in step_dirs(root) if is_complete(os.path.join(root, n))]
    return os.path.join(root, complete[-1]) if complete else None


class StopMarker:
    def __init__(self, run_dir: str, env=os.environ):
        self.path = os.path.join(run_dir, STOPPED)
        self.job = job_id(env)
        self.attempt = int(env.get("TORCHELASTIC_RESTART_COUNT", "0"))

    def check(self) -> None:
        """On an in-job restart, raise if an earlier attempt of this job stopped for good."""
        if self.attempt == 0 or not os.path.isfile(self.path):
            return
        with open(self.path) as f:
            marker = json.load(f)
        if marker.get("job") == self.job:
            raise RuntimeError(f"not restarting: attempt {marker['attempt']} of this job stopped for a reason a "
                               f"restart would repeat ({self.path}): {marker['reason']}")  # fmt: skip

    def write(self, reason: str) -> None:
        write_json_atomic(self.path, {"job": self.job, "attempt": self.attempt, "reason": reason})


def microbatches_for(cfg, saved_global: int | None, dp: int) -> int:
    """train.microbatches for this resume: the one that keeps DP x microbatches = saved_global when
    asked (train.keep_global_batch) and possible, else the configured one (with a warning)."""
    m = cfg.train.microbatches
    if not saved_global or saved_global == dp * m:
        return m
    fits = saved_global % dp == 0 and (not cfg.parallel.vpp or (saved_global // dp) % cfg.parallel.pp == 0)
    if cfg.train.keep_global_batch and fits:
        log.warning(f"resuming at data-parallel size {dp}: train.microbatches {m} -> {saved_global // dp}, keeping "
                    f"the checkpoint's global batch of {saved_global} micro-batches per step (train.keep_global_batch)")
        return saved_global // dp
    why = "train.keep_global_batch is false" if not cfg.train.keep_global_batch else f"{dp} does not divide it"
    log.warning(f"the global batch CHANGES on this resume: the checkpoint took {saved_global} micro-batches per step, "
                f"this run takes {dp * m} (data-parallel size {dp} x train.microbatches {m}; {why}). Set "
                "train.microbatches to change it, e.g. with a data-parallel size that divides "
                f"{saved_global}")  # fmt: skip
    return m
