"""torchrun, made safe to signal: `python -m mugv.parallel.agent [--orphan-grace=S] <torchrun args>`.

torchrun's own answer to SIGTERM / SIGINT is to send SIGTERM to every worker's process group
(which also kills helper processes the workers started) and SIGKILL 30 s later -- too soon for a
large checkpoint, and wrong when the signal was meant as "save and stop". This wrapper runs
torchrun's launcher in this process with its signal handling replaced:

  * SIGTERM / SIGUSR1 (a scheduler's pre-emption, `scancel`, Slurm's `--signal`): relayed to
    every worker, which finishes its step, saves a checkpoint and exits 0; torchrun then ends
    normally. Workers started later (a restart) get the signal too.
  * SIGINT (Ctrl-C): the first is relayed as SIGTERM (stop and save); a second kills every
    worker's process group at once (SIGKILL) and exits 130.
  * the launcher that started this agent dies (even by SIGKILL; this agent runs in a session of
    its own, so a signal to the launcher's group does not reach it): the workers are told to stop
    and save as for SIGTERM, and killed if they have not exited `--orphan-grace` seconds later.

A signal that arrives while a worker is still starting is not lost: workers start with these
signals blocked (the mask is inherited), and the trainer unblocks them once its handler is
installed (mugv.training.guards.StopSignals), when the pending signal is delivered.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
DEFAULT_ORPHAN_GRACE_S = 120.0  # (the launcher passes watchdog.orphan_grace_s)
_POLL_S = 0.5


def children(pid: int) -> list[int]:
    """Direct children of a process (Linux /proc); [] where that is not available."""
    out: list[int] = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out += [int(c) for c in f.read().split()]
    except OSError:
        return []
    return out


def kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def kill_group(pid: int) -> None:
    """SIGKILL the process group `pid` leads (torchrun starts each worker as a session leader),
    else the process alone."""
    try:
        if os.getpgid(pid) == pid:
            os.killpg(pid, signal.SIGKILL)
            return
    except (ProcessLookupError, PermissionError):
        pass
    kill(pid, signal.SIGKILL)


class Agent:
    """The signal side of the agent; `main` runs torchrun under it."""

    def __init__(self, orphan_grace_s: float = DEFAULT_ORPHAN_GRACE_S):
        self.orphan_grace_s = orphan_grace_s
        self.stop: int | None = None  # the signal relayed to the workers, once one was asked for
        self.interrupts = 0
        self.orphaned_at: float | None = None
        self._signalled: set[int] = set()
        self._parent = os.getppid()
        self._lock = threading.Lock()

    def handle(self, signum: int, frame=None) -> None:
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts >= 2:
                self.abort("second interrupt")
            signum = signal.SIGTERM
        self.request(signum)

    def request(self, signum: int) -> None:
        with self._lock:
            if self.stop is None:
                self.stop = signum
                print(f"[agent] {signal.Signals(signum).name}: asking the workers to save and stop", file=sys.stderr,
                      flush=True)
            self.relay()

    def relay(self) -> None:
        """Send the stop signal to every worker not yet sent it."""
        if self.stop is None:
            return
        for pid in children(os.getpid()):
            if pid not in self._signalled:
                self._signalled.add(pid)
                kill(pid, self.stop)

    def abort(self, why: str) -> None:
        print(f"[agent] {why}: killing the workers", file=sys.stderr, flush=True)
        for pid in children(os.getpid()):
            kill_group(pid)
        os._exit(130)

    def watch(self) -> None:
        """Relay to workers that start after the request; act on the launcher's death."""
        while True:
            time.sleep(_POLL_S)
            with self._lock:
                self.relay()
            if self.orphaned_at is None and os.getppid() != self._parent:
                self.orphaned_at = time.monotonic()
                print("[agent] the launcher is gone", file=sys.stderr, flush=True)
                self.request(signal.SIGTERM)
            if self.orphaned_at is not None and time.monotonic() - self.orphaned_at > self.orphan_grace_s:
                self.abort(f"the workers did not stop within {self.orphan_grace_s:.0f} s of the launcher's death")


def parse(argv: list[str]) -> tuple[float, list[str]]:
    grace = DEFAULT_ORPHAN_GRACE_S
    rest = list(argv)
    while rest and rest[0].startswith("--orphan-grace="):
        grace = float(rest.pop(0).split("=", 1)[1])
    return grace, rest


def main(argv: list[str] | None = None) -> None:
    grace, args = parse(sys.argv[1:] if argv is None else argv)
    agent = Agent(grace)
    # torchrun installs its own handlers (which kill the workers) for the signals named here, on
    # every worker (re)start; keep ours for the stop signals
    args = ["--signals-to-handle=SIGHUP,SIGQUIT", *args]
    # torch 2.13 shares the agent's TCPStore with the workers, unprefixed across restarts: the ranks
    # of a restarted attempt read the previous attempt's gloo addresses and fail to connect. A
    # store per rendezvous round (hosted by global rank 0) has none of that
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    for s in STOP_SIGNALS:
        signal.signal(s, agent.handle)
    # the watcher leaves the signals unblocked (the kernel delivers them to it and Python runs the
    # handler in the main thread); the main thread blocks them so that workers inherit the mask
    threading.Thread(target=agent.watch, daemon=True, name="mugv-agent").start()
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    from torch.distributed.run import main as torchrun

    torchrun(args)


if __name__ == "__main__":
    main()
