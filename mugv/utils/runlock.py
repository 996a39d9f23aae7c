"""One run per run directory: `<run_dir>/.lock`, held by the run's global rank 0.

    lock = RunLock(run_dir, job="<id shared by the restarts of one job>")
    lock.acquire()        # RunLockError naming the holder (host, pid, start time) if another run has it
    ...                   # a thread refreshes the lock's heartbeat every HEARTBEAT_S
    lock.release()

The lock file is JSON {host, pid, pid_start, started, job, heartbeat} created with O_EXCL. A
lock is *stale* -- and taken over, saying so -- when its holder is gone: on this host, its pid
no longer runs (or runs another program: the pid's start time differs); on another host, its
heartbeat is older than STALE_S or it was taken by an earlier attempt of the same job (an
in-job restart that moved rank 0; `job_id`). `check_free` is the launcher's early look (no lock taken).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from datetime import datetime

from mugv.utils.logging import get_logger

log = get_logger("lock")
LOCK_NAME = ".lock"
HEARTBEAT_S = 10.0
STALE_S = 60.0


class RunLockError(RuntimeError):
    """The run directory is in use by another run."""


def _pid_start(pid: int) -> str | None:
    """The start time of a process on this host (clock ticks since boot, /proc), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_lock(path: str) -> dict | None:
    """The lock's content; None if there is no lock; {} if it is unreadable (being written)."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}


def stale_reason(info: dict, job: str = "", now: float | None = None) -> str | None:
    """Why the lock `info` no longer holds (None: it does)."""
    now = time.time() if now is None else now
    if info.get("host") == socket.gethostname():
        pid = int(info.get("pid", -1))
        if pid <= 0 or not _alive(pid):
            return f"process {pid} is gone"
        start = _pid_start(pid)
        if info.get("pid_start") and start and start != info["pid_start"]:
            return f"process {pid} is another program now"
        return None
    if job and info.get("job") == job:
        return "it was taken by an earlier attempt of this job"
    age = now - float(info.get("heartbeat", 0))
    return f"its heartbeat is {age:.0f} s old" if age > STALE_S else None


def job_id(env) -> str:
    """What the attempts of one job share and no other running job has: the Slurm job, else the
    launcher's MUGV_JOB_ID (mugv.cli.train sets it from the multi-node rendezvous), else
    torchrun's run id (a fresh uuid per standalone torchrun)."""
    if env.get("SLURM_JOB_ID"):
        return f"slurm:{env['SLURM_JOB_ID']}"
    return env.get("MUGV_JOB_ID") or env.get("TORCHELASTIC_RUN_ID", "")


def describe(info: dict, path: str) -> str:
    started = info.get("started", 0)
    when = datetime.fromtimestamp(started).isoformat(sep=" ", timespec="seconds") if started else "?"
    return f"host {info.get('host', '?')}, pid {info.get('pid', '?')}, started {when} (lock file {path})"


def check_free(run_dir: str, job: str = "") -> None:
    """Raise RunLockError if a live run holds run_dir (no lock is taken)."""
    path = os.path.join(run_dir, LOCK_NAME)
    info = read_lock(path)
    if info and stale_reason(info, job) is None:
        raise RunLockError(_in_use(run_dir, info, path))


def _in_use(run_dir: str, info: dict, path: str) -> str:
    return (
        f"run directory {run_dir} is in use by another run: {describe(info, path)}. Stop that run or "
        "use another run_dir; a lock whose holder is gone is taken over automatically"
    )


class RunLock:
    def __init__(self, run_dir: str, job: str = ""):
        self.run_dir, self.job = run_dir, job
        self.path = os.path.join(run_dir, LOCK_NAME)
        self.info: dict | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self, attempts: int = 5) -> None:
        os.makedirs(self.run_dir, exist_ok=True)
        now = time.time()
        info = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _pid_start(os.getpid()),
                "started": now, "job": self.job, "heartbeat": now}  # fmt: skip
        for _ in range(attempts):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                held = read_lock(self.path)
                if held == {}:  # being written by its taker: look again
                    time.sleep(0.2)
                    continue
                if held is None:
                    continue
                why = stale_reason(held, self.job)
                if why is None:
                    raise RunLockError(_in_use(self.run_dir, held, self.path)) from None
                log.warning(f"taking over the lock of {self.run_dir} from {describe(held, self.path)}: {why}")
                aside = f"{self.path}.stale.{os.getpid()}"
                try:  # one taker wins the rename; the others find the new lock
                    os.rename(self.path, aside)
                    os.remove(aside)
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(info, f)
            self.info = info
            self._thread = threading.Thread(target=self._beat, daemon=True, name="mugv-runlock")
            self._thread.start()
            return
        raise RunLockError(f"could not take the lock {self.path} after {attempts} attempts")

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            if not self._holds():
                log.error(f"{self.path} was taken over by another run")
                return
            self.info["heartbeat"] = time.time()
            tmp = f"{self.path}.{os.getpid()}.tmp"
            try:
                with open(tmp, "w") as f:
                    json.dump(self.info, f)
                os.replace(tmp, self.path)
            except OSError:  # a full disk: the lock stays, its heartbeat ages
                pass

    def _holds(self) -> bool:
        held = read_lock(self.path)
        return bool(held) and held.get("pid") == os.getpid() and held.get("host") == socket.gethostname()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        if self.info is not None and self._holds():
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass
        self.info = None
