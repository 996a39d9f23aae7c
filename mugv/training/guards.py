"""Stop rules of the training loop: non-finite steps, pre-emption signals and a wall-time budget.

    guard = NonFiniteGuard(cfg.train.max_nonfinite_in_row)
    signals = StopSignals()                               # SIGTERM / SIGUSR1 / SIGINT set a flag
    budget = TimeBudget(cfg.train.time_budget_minutes)
    ...
        apply = guard.check(step, loss, grad_norm, batch.ids)   # collective when distributed
        ...
        if agree(signals.requested or budget.expired()):        # every rank stops at one step
            save checkpoint; exit 0

Everything that decides whether to skip or stop is agreed over all ranks (all-reduce MAX), so
no rank applies an update that another skips, and one rank's signal stops every rank at the
same step.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from mugv.utils.logging import get_logger

_MAX_IDS_SHOWN = 16


def agree(flag: bool, group: Any = None) -> bool:
    """True on every rank if `flag` is True on any rank of `group` (all-reduce MAX).

    Without an initialised process group this is `flag` itself. Collective: every rank of the
    group must call it at the same point."""
    return agree_all([flag], group)[0]


def agree_all(flags: Sequence[bool], group: Any = None) -> list[bool]:
    """`agree` for several flags in one all-reduce."""
    if not (dist.is_available() and dist.is_initialized()):
        return [bool(f) for f in flags]
    device = torch.device("cpu")
    if dist.get_backend(group) == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    t = torch.tensor([1 if f else 0 for f in flags], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return [bool(v) for v in t.tolist()]


def _finite(value: Any) -> bool:
    """None counts as finite (e.g. no loss on a non-last pipeline stage)."""
    if value is None:
        return True
    if isinstance(value, torch.Tensor):
        return bool(torch.isfinite(value).all())
    return math.isfinite(float(value))


def _show_ids(ids: Sequence[str]) -> str:
    shown = list(ids[:_MAX_IDS_SHOWN])
    more = f" (+{len(ids) - len(shown)} more)" if len(ids) > len(shown) else ""
    return f"{shown}{more}"


class DivergenceError(RuntimeError):
    """max_in_row consecutive non-finite steps; `first_step` is the first of them (the number of
    updates applied before it: a checkpoint of that many steps or more holds the diverged state)."""

    def __init__(self, message: str, first_step: int):
        super().__init__(message)
        self.first_step = first_step


class NonFiniteGuard:
    """Skips steps whose loss or grad norm is NaN/inf and stops after `max_in_row` in a row.

    `check` returns True when the update may be applied. Megatron already reports found_inf /
    update_successful from optimizer.step() under loss scaling; this object keeps the counts
    and the stop rule, and catches the bf16/fp32 case where nothing else would skip."""

    def __init__(self, max_in_row: int, agree_fn: Callable[[bool], bool] = agree):
        if max_in_row < 1:
            raise ValueError(f"train.max_nonfinite_in_row must be >= 1, got {max_in_row}")
        self.max_in_row = max_in_row
        self._agree = agree_fn
        self.in_row = 0
        self.skipped_total = 0
        self._recent: list[tuple[int, list[str]]] = []  # (step, this rank's ids) of the current run

    def check(self, step: int, loss: Any, grad_norm: Any, sample_ids: Sequence[str]) -> bool:
        """Collective when distributed (see `agree`). Raises DivergenceError on the max_in_row-th
        consecutive non-finite step, naming the steps and this rank's sample ids."""
        local_bad = not (_finite(loss) and _finite(grad_norm))
        if local_bad:
            get_logger().warning(
                f"step {step}: non-finite loss={_fmt(loss)} grad_norm={_fmt(grad_norm)}; "
                f"samples on this rank: {_show_ids(list(sample_ids))}"
            )
        if not self._agree(local_bad):
            self.in_row = 0
            self._recent.clear()
            return True
        self.in_row += 1
        self.skipped_total += 1
        self._recent.append((step, list(sample_ids)))
        if self.in_row >= self.max_in_row:
            history = "; ".join(f"step {s}: {_show_ids(ids)}" for s, ids in self._recent)
            raise DivergenceError(
                f"step {step}: {self.in_row} consecutive steps with a non-finite loss or grad norm "
                f"(train.max_nonfinite_in_row={self.max_in_row}); samples on this rank: {history}",
                self._recent[0][0],
            )
        return False

    def state_dict(self) -> dict:
        return {"skipped_total": self.skipped_total}

    def load_state_dict(self, state: dict) -> None:
        self.skipped_total = int(state["skipped_total"])


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            return f"tensor of {value.numel()} with {int((~torch.isfinite(value)).sum())} non-finite"
        value = value.item()
    return f"{float(value):.4g}"


class StopSignals:
    """Sets a flag on SIGTERM / SIGUSR1 (pre-emption) and on the first SIGINT (Ctrl-C); the
    handler does nothing else. A second SIGINT kills the process at once (the default action is
    restored after the first). `request(reason)` sets the flag from code (e.g. the launcher died).

    Install from the main thread. Installing also unblocks these signals: under the agent
    (mugv.parallel.agent) workers start with them blocked, so that one sent while the process was
    starting is delivered now instead of killing it. `uninstall` restores the previous handlers."""

    def __init__(self, signals: Sequence[int] = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)):
        self.signals = tuple(signals)
        self._received: int | str | None = None
        self._previous: dict[int, Any] = {}
        self.install()

    def _handler(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.SIG_DFL)  # a second Ctrl-C aborts
        if self._received is None:
            self._received = signum

    def request(self, reason: str) -> None:
        if self._received is None:
            self._received = reason

    def install(self) -> None:
        for s in self.signals:
            if s not in self._previous:
                self._previous[s] = signal.signal(s, self._handler)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, self.signals)

    def uninstall(self) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous if previous is not None else signal.SIG_DFL)
        self._previous.clear()

    @property
    def requested(self) -> bool:
        return self._received is not None

    @property
    def signal_name(self) -> str | None:
        if self._received is None or isinstance(self._received, str):
            return self._received
        return signal.Signals(self._received).name

    def __enter__(self) -> StopSignals:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.uninstall()


class TimeBudget:
    """Wall-time budget from construction; `minutes <= 0` never expires."""

    def __init__(self, minutes: float, clock: Callable[[], float] = time.monotonic):
        self.seconds = float(minutes) * 60.0
        self._clock = clock
        self._start = clock()

    def elapsed(self) -> float:
        return self._clock() - self._start

    def expired(self) -> bool:
        return self.seconds > 0 and self.elapsed() >= self.seconds
