"""Starting processes: the one place that builds torchrun commands, picks free ports and spawns ranks.

    cmd = Rendezvous.from_env(os.environ).command(2, ["train", "cfg.yaml"], rdzv_id="stage")
    rc = SignalRelay().run(cmd, os.environ)        # the agent in its own session, signals forwarded
    results = spawn(fn, 2, arg)                     # fn(rank, world, arg) on 2 local processes

`Rendezvous` is where torchrun meets its peers: `--standalone` on one machine, or c10d at
MASTER_ADDR:MASTER_PORT when NNODES (with NODE_RANK, MASTER_ADDR, MASTER_PORT) is set. The
command runs torchrun under mugv.parallel.agent (which turns SIGTERM / SIGUSR1 / SIGINT into
"save and stop" for the workers instead of torchrun's kill, and stops them when the launcher
dies) with `python -m mugv.cli.main <args>` on every process.

`SignalRelay.run` starts the agent in a session of its own (a Ctrl-C or a signal to the
launcher's process group does not reach it twice) and forwards SIGTERM / SIGUSR1 / SIGINT to it.

`spawn` runs a picklable function on N fresh local processes (spawn, or a fork server with
modules preloaded), each with RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and a free MASTER_PORT
set; a process group the function leaves behind is torn down after it returns. A failing or
dying rank raises `DistributedRankError` in the parent with its traceback, and the others are
killed; nothing outlives `timeout`.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from mugv.config import ConfigError
from mugv.parallel.agent import STOP_SIGNALS, kill

RANK_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
LOCALHOST = "127.0.0.1"


class LaunchError(ConfigError):
    """A launch that cannot work as asked (missing rendezvous variables, wrong node count)."""


class DistributedRankError(RuntimeError):
    """A spawned rank raised (or died); the message carries its traceback."""


def free_port(host: str = LOCALHOST) -> int:
    """A TCP port that was free on `host` a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def rank_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    """The torchrun-style variables of one local rank."""
    return dict(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
                MASTER_ADDR=LOCALHOST, MASTER_PORT=str(port))  # fmt: skip


@contextmanager
def single_process_env() -> Iterator[None]:
    """Be our own rendezvous for a one-process run (a free port); the variables are restored after."""
    saved = {k: os.environ.get(k) for k in RANK_VARS}
    os.environ.update(rank_env(0, 1, free_port()))
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---------------------------------------------------------------------------------------------
# torchrun
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rendezvous:
    """Where torchrun meets its peers: this machine alone, or one node of a multi-node job."""

    nnodes: int = 1
    node_rank: str = "0"
    endpoint: str = ""  # MASTER_ADDR:MASTER_PORT (multi-node only)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Rendezvous:
        if "NNODES" not in env:
            return cls()
        missing = [k for k in ("NODE_RANK", "MASTER_ADDR", "MASTER_PORT") if not env.get(k)]
        if missing:
            raise LaunchError(f"NNODES is set but {', '.join(missing)} is not (multi-node launch)")
        return cls(int(env["NNODES"]), env["NODE_RANK"], f"{env['MASTER_ADDR']}:{env['MASTER_PORT']}")

    @classmethod
    def placeholder(cls, nnodes: int) -> Rendezvous:
        """The rendezvous each node of an `nnodes` job would use, with shell variables (dry runs)."""
        return cls(nnodes, "$NODE_RANK", "$MASTER_ADDR:$MASTER_PORT")

    def command(self, nproc: int, args: Sequence[str], rdzv_id: str = "mugv", max_restarts: int = 0,
                orphan_grace_s: float | None = None) -> list[str]:
        """`python -m mugv.parallel.agent ... -m mugv.cli.main <args>`: torchrun (under the agent's
        signal handling) with nproc processes here, restarting them all up to max_restarts times
        when one fails."""
        cmd = [sys.executable, "-m", "mugv.parallel.agent"]
        if orphan_grace_s is not None:
            cmd.append(f"--orphan-grace={orphan_grace_s:g}")
        if max_restarts:
            cmd.append(f"--max-restarts={max_restarts}")
        if self.endpoint:
            cmd += [f"--nnodes={self.nnodes}", f"--node-rank={self.node_rank}", "--rdzv-backend=c10d",
                    f"--rdzv-endpoint={self.endpoint}", f"--rdzv-id={rdzv_id}"]  # fmt: skip
        else:
            cmd += ["--standalone"]
        return [*cmd, f"--nproc-per-node={nproc}", "-m", "mugv.cli.main", *args]

    def check(self, nnodes: int, what: str) -> None:
        """Raise unless `what` (asking for `nnodes` nodes) can run under this rendezvous."""
        if nnodes != self.nnodes:
            how = (
                f"this job has NNODES={self.nnodes}"
                if self.endpoint
                else "this is a single-machine run (set NNODES/NODE_RANK/MASTER_ADDR/MASTER_PORT on every "
                "node, e.g. with scripts/train_multi_node.sh)"
            )
            raise LaunchError(f"{what} asks for nnodes={nnodes}, but {how}")


def launch_env(env: Mapping[str, str], nproc: int) -> dict[str, str]:
    """The environment for torchrun: OMP_NUM_THREADS=1 with several processes unless set (what
    torchrun would set itself, without its banner about it)."""
    out = dict(env)
    if nproc > 1:
        out.setdefault("OMP_NUM_THREADS", "1")
    return out


class SignalRelay:
    """Runs a launcher (the agent, mugv.parallel.agent) in a session of its own and forwards SIGTERM,
    SIGUSR1 and SIGINT to it: the agent relays them to the training processes, which finish the
    step, save and exit (a second SIGINT makes it kill them). `received` is the last signal
    forwarded (None if none)."""

    def __init__(self):
        self.received: int | None = None
        self._proc: subprocess.Popen | None = None

    def _forward(self, signum, frame) -> None:
        self.received = signum
        if self._proc is not None:
            kill(self._proc.pid, signum)

    def run(self, cmd: list[str], env: Mapping[str, str]) -> int:
        main = threading.current_thread() is threading.main_thread()
        previous = {s: signal.signal(s, self._forward) for s in STOP_SIGNALS} if main else {}
        try:
            self._proc = subprocess.Popen(cmd, env=dict(env), start_new_session=True)
            return self._proc.wait()
        finally:
            if self._proc is not None and self._proc.poll() is None:  # we are unwinding: stop it
                kill(self._proc.pid, signal.SIGTERM)
                self._proc.wait()
            self._proc = None
            for s, h in previous.items():
                signal.signal(s, h if h is not None else signal.SIG_DFL)


# ---------------------------------------------------------------------------------------------
# local ranks of a Python function
# ---------------------------------------------------------------------------------------------

_CONTEXTS: dict[str, Any] = {}


def _context(method: str, preload: Sequence[str]):
    if method not in _CONTEXTS:
        ctx = mp.get_context(method)
        if method == "forkserver" and preload:
            ctx.set_forkserver_preload(list(preload))
        _CONTEXTS[method] = ctx
    return _CONTEXTS[method]


def _rank_main(fn: Callable, rank: int, world: int, port: int, args: tuple, results, threads: int | None):
    os.environ.update(rank_env(rank, world, port))
    if threads:
        import torch

        torch.set_num_threads(threads)
    try:
        # plain pickle: tensors go by value, not as shared-memory handles that die with this process
        results.put((rank, True, pickle.dumps(fn(rank, world, *args))))
    except BaseException:  # reported to the parent, which raises
        results.put((rank, False, traceback.format_exc()))
    finally:
        _teardown()


def _teardown() -> None:
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    from mugv.parallel.runtime import destroy_distributed

    try:
        dist.barrier()
        destroy_distributed()
    except Exception:  # the rank is exiting anyway; its result (or error) is already sent
        pass


def spawn(
    fn: Callable,
    world: int,
    *args: Any,
    timeout: float = 3600.0,
    method: str = "spawn",
    preload: Sequence[str] = (),
    threads: int | None = None,
) -> list[Any]:
    """fn(rank, world, *args) on `world` fresh local processes; the results by rank.

    method: "spawn" (fresh interpreters) or "forkserver" (children forked from a server that has
    imported `preload` once: a rank costs a fork, not an import). threads: torch threads per rank.
    Raises DistributedRankError with the rank's traceback if a rank fails or dies, TimeoutError
    if not all ranks finish within `timeout` seconds; the other ranks are killed."""
    ctx = _context(method, preload)
    results = ctx.Queue()
    port = free_port()
    procs = [  # not daemonic: ranks may start helper processes (async checkpoint writers)
        ctx.Process(target=_rank_main, args=(fn, r, world, port, args, results, threads)) for r in range(world)
    ]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(out) < world:
            try:
                rank, ok, payload = results.get(timeout=0.05)
            except queue.Empty:
                _check_alive(procs, out, results)
                if time.monotonic() > deadline:
                    missing = sorted(set(range(world)) - set(out))
                    raise TimeoutError(f"spawn: ranks {missing} did not finish within {timeout} s") from None
                continue
            if not ok:
                raise DistributedRankError(f"rank {rank} of {world} failed:\n{payload}")
            out[rank] = pickle.loads(payload)
        for p in procs:  # results are in; give teardown a few seconds, then kill
            p.join(min(10.0, max(0.1, deadline - time.monotonic())))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(5)
        results.close()
    return [out[r] for r in range(world)]


def _check_alive(procs, out: dict, results) -> None:
    for rank, p in enumerate(procs):
        if rank not in out and p.exitcode is not None:
            time.sleep(0.2)  # a result put just before exit may still be in the pipe
            if results.empty():
                raise DistributedRankError(f"rank {rank} exited with code {p.exitcode} without a result")
