"""A per-rank watchdog thread: a hung step ends the job within minutes, naming the slow rank,
and a rank whose launcher died stops.

    dog = RankWatchdog(cfg.watchdog, on_orphan=signals.request)
    dog.begin(step)              # a step starts (its data is being fetched)
    dog.mark(step, "compute")    # data in hand: forward/backward
    dog.mark(step, "sync")       # compute done: waiting in the gradient reduction
    dog.end(step)                # the step is over: saves, previews (a longer limit) until begin
    dog.stop()

Hangs: a step that has run longer than max(watchdog.min_step_s, watchdog.step_factor x the median
of the last steps) -- watchdog.first_step_s until MEDIAN_OF steps are known -- or anything between
steps (a save, a preview) running longer than watchdog.save_s. The rank that sees it reads every
rank's last progress mark from the rendezvous store (each rank posts (step, phase, time) there, 3
small writes a step), names the ranks furthest behind, and aborts the job through fail-fast
with stacks: every rank dumps the Python stack of all its threads (faulthandler) and exits --
instead of waiting for the collective timeout (30 min on NCCL).

Orphans: when the process that started this rank (the agent; mugv.parallel.agent) is gone,
`on_orphan` is called (the trainer stops at the next step and saves); if the process is still
running watchdog.orphan_grace_s later, its stacks are dumped and it exits.
"""

from __future__ import annotations

import os
import statistics
import sys
import threading
import time
from collections import deque
from collections.abc import Callable

import torch.distributed as dist

from mugv.parallel import failfast

PHASES = ("data", "compute", "sync")
MEDIAN_OF = 20  # recent step durations the limit is taken from (at least 3 known)
_POLL_S = 1.0


def _progress_key(rank: int) -> str:
    return f"mugv/progress/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/{rank}"


class RankWatchdog:
    def __init__(self, cfg, on_orphan: Callable[[str], None] | None = None, poll_s: float = _POLL_S):
        self.cfg, self.on_orphan, self.poll_s = cfg, on_orphan, poll_s
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        self.store = failfast._store() if dist.is_initialized() else None
        self.durations: deque[float] = deque(maxlen=MEDIAN_OF)
        self.step, self.phase = -1, "start"
        self.started = time.monotonic()  # of the current step or interval between steps
        self.in_step = False
        self.parent = os.getppid()
        self.orphaned_at: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="mugv-watchdog")
        self._thread.start()

    # -- main thread ---------------------------------------------------------------------------

    def begin(self, step: int) -> None:
        self.step, self.in_step, self.started = step, True, time.monotonic()
        self.mark(step, "data")

    def mark(self, step: int, phase: str) -> None:
        self.phase = phase
        if self.store is not None:
            try:
                self.store.set(_progress_key(self.rank), f"{step} {PHASES.index(phase)} {time.time():.3f}")
            except Exception:  # the store is gone: the job is ending
                self.store = None

    def end(self, step: int) -> None:
        now = time.monotonic()
        self.durations.append(now - self.started)
        self.in_step, self.phase, self.started = False, "between steps", now

    def stop(self) -> None:
        self._stop.set()

    # -- the thread ------------------------------------------------------------------------------

    def limit(self) -> tuple[float, str]:
        """(seconds the current step or interval may run, how that was set)."""
        c = self.cfg
        if not self.in_step:
            return c.save_s, "watchdog.save_s (saves and previews between steps)"
        if len(self.durations) < 3:
            return c.first_step_s, "watchdog.first_step_s (the first steps)"
        median = statistics.median(self.durations)
        limit = max(c.min_step_s, c.step_factor * median)
        return limit, (f"max(watchdog.min_step_s {c.min_step_s:g}, watchdog.step_factor {c.step_factor:g} x "
                       f"median step {median:.3f} s)")  # fmt: skip

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            now = time.monotonic()
            if self.orphaned_at is None and os.getppid() != self.parent:
                self.orphaned_at = now
                print(f"[rank {self.rank}] the launcher is gone: stopping at the next step", file=sys.stderr, flush=True)
                if self.on_orphan is not None:
                    self.on_orphan("launcher gone")
            if self.orphaned_at is not None and now - self.orphaned_at > self.cfg.orphan_grace_s:
                failfast.abort(f"still running {self.cfg.orphan_grace_s:g} s after its launcher died "
                               "(watchdog.orphan_grace_s)", stacks=True)  # fmt: skip
            if self.cfg.step_factor <= 0:
                continue
            limit, why = self.limit()
            elapsed = now - self.started
            if elapsed > limit:
                where = f"step {self.step + 1}" if self.in_step else f"the interval after step {self.step + 1}"
                failfast.abort(f"hang: {where} has run {elapsed:.0f} s on rank {self.rank} (limit {limit:.0f} s = "
                               f"{why}); {self.laggards()}", stacks=True)  # fmt: skip

    def laggards(self) -> str:
        """Which ranks are furthest behind, from the progress marks in the store."""
        if self.store is None or self.world == 1:
            return "single process"
        marks = {}
        for r in range(self.world):
            marks[r] = (-1, 0, 0.0)  # no mark yet (or the store is gone)
            try:
                if self.store.check([_progress_key(r)]):  # (a get of a missing key would block)
                    step, phase, at = self.store.get(_progress_key(r)).decode().split()
                    marks[r] = (int(step), int(phase), float(at))
            except Exception:
                pass
        low = min((s, p) for s, p, _ in marks.values())
        slow = [r for r, (s, p, _) in marks.items() if (s, p) == low]
        if len(slow) == self.world:
            return f"every rank is in step {low[0] + 1} ({PHASES[low[1]]}): none is behind the others"
        ago = time.time() - max(marks[r][2] for r in slow)
        return (f"slowest rank(s) {slow}: last progress step {low[0] + 1} {PHASES[low[1]]}, {ago:.0f} s ago "
                f"(the others are further on)")  # fmt: skip
