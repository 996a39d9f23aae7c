"""One failing rank ends the whole job, promptly, on NCCL and gloo alike.

A rank whose code raises cannot simply re-raise: its peers sit in a collective waiting for it
and, on NCCL, wait there until the process-group timeout (30 minutes). `fail_fast()` wraps a
rank's work: on an exception it logs the error with its traceback, posts it under one key of
the job's rendezvous store, and exits the process at once (non-zero, no barrier, no teardown
that could block). Every rank runs a small watcher thread that polls that key; when it
appears, the watcher logs which rank failed and why, and exits its own process the same way. A
rank that dies without raising (a signal, OOM kill) is left to the launcher (torchrun stops
the others when a worker exits non-zero) and to the hang watchdog (mugv.parallel.watchdog),
which posts its finding with `abort(reason, stacks=True)`: then every rank dumps the Python
stacks of all its threads (faulthandler) before it exits. `at_exit(fn)` registers a cleanup
(e.g. releasing the run lock) that runs before such an exit.
"""

from __future__ import annotations

import faulthandler
import os
import sys
import threading
import traceback
from collections.abc import Callable
from contextlib import contextmanager

import torch.distributed as dist

from mugv.utils.logging import get_logger

log = get_logger("failfast")
ABORT_KEY = f"mugv/abort/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"  # one per torchrun attempt
EXIT_CODE = 3
STACKS = "[stacks] "  # an abort reason with this prefix makes every rank dump its stacks
_AT_EXIT: list[Callable[[], None]] = []


def at_exit(fn: Callable[[], None]) -> None:
    """Run fn (best effort) before this process exits through fail-fast."""
    _AT_EXIT.append(fn)


def dump_stacks(header: str) -> None:
    """Every thread's Python stack of this process to stderr."""
    print(header, file=sys.stderr, flush=True)
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    sys.stderr.flush()


def abort(reason: str, stacks: bool = False) -> None:
    """End every rank: post `reason` for the others' watchers, then exit this process."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    store = _store() if dist.is_initialized() else None
    if store is not None:
        try:
            store.set(ABORT_KEY, (STACKS if stacks else "") + reason)
        except Exception:
            pass
    if stacks:
        dump_stacks(f"[rank {rank}] Python stacks at the abort:")
    _exit(f"[rank {rank}] {reason}")


def _store():
    try:
        return dist.distributed_c10d._get_default_store()
    except (RuntimeError, ValueError):
        return None


def _exit(message: str) -> None:
    for fn in _AT_EXIT:
        try:
            fn()
        except Exception:
            pass
    print(message, file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(EXIT_CODE)


def _watch(stop: threading.Event, poll_s: float) -> None:
    store = None
    while not stop.wait(poll_s):
        try:
            store = store or (_store() if dist.is_initialized() else None)
            if store is not None and store.check([ABORT_KEY]):
                reason = store.get(ABORT_KEY).decode(errors="replace")
                if reason.startswith(STACKS):
                    reason = reason[len(STACKS) :]
                    dump_stacks(f"[rank {dist.get_rank()}] Python stacks at the abort:")
                _exit(f"[rank {dist.get_rank()}] aborting: {reason}")
        except Exception:  # the store went away: the job is ending anyway
            return


@contextmanager
def fail_fast(poll_s: float = 1.0):
    """Run the body so that an exception on any rank ends every rank within ~poll_s seconds,
    each exiting with EXIT_CODE and the failing rank's error in its log. The process group may
    be set up inside the body; before it is (or without torch.distributed) an error re-raises."""
    stop = threading.Event()
    watcher = threading.Thread(target=_watch, args=(stop, poll_s), daemon=True, name="mugv-failfast")
    watcher.start()
    try:
        yield
    except BaseException as err:
        store = _store() if dist.is_initialized() else None
        if store is None or (isinstance(err, SystemExit) and not err.code):
            raise
        rank = dist.get_rank()
        summary = f"rank {rank} failed: {type(err).__name__}: {err}"
        log.error(f"{summary}\n{traceback.format_exc()}")
        try:
            store.set(ABORT_KEY, summary)
        except Exception:
            pass
        _exit(f"[rank {rank}] {summary}")
    finally:
        stop.set()
