"""Learning-rate schedule of a training stage: constant, cosine or warmup-stable-decay (WSD).

    sched = LRSchedule(cfg.optim, total_steps=cfg.train.steps)
    for step in range(start, total):      # step = updates already applied (0 for the first)
        sched.apply(optimizer, step)      # before optimizer.step()
        ...

Let n = step + 1 be the number of the update being taken (1..total_steps), W the warmup steps,
D the decay steps, peak = optim.lr and floor = optim.min_lr:

    warmup (n <= W)       lr = peak * n / W                 (linear from 0; update W is at peak)
    constant              lr = peak
    cosine                p = clamp((n - W) / D, 0, 1), D = decay_steps or total_steps - W
                          lr = floor + (peak - floor) * (1 + cos(pi * p)) / 2
    wsd                   stable at peak until n = total_steps - D, then linear to floor:
                          lr = peak + (floor - peak) * (n - (total_steps - D)) / D

so the last update of a cosine run (without decay_steps) and of a WSD run is taken at min_lr.

The schedule has no state of its own: it is a function of the config and the step. A checkpoint
records the config (`state_dict`) so a resumed run can tell when it changed. Loading a record
that differs is allowed and only logged: a new curriculum stage (a new config, started with
train.init_from) is expected to bring its own schedule, and the current config always wins.
"""

from __future__ import annotations

import math
from typing import Any

from mugv.training.config import OptimConfig
from mugv.utils.logging import get_logger

_STATE_KEYS = ("schedule", "lr", "min_lr", "warmup_steps", "decay_steps", "total_steps")


class LRSchedule:
    def __init__(self, optim: OptimConfig, total_steps: int):
        self.kind = optim.schedule
        self.peak = float(optim.lr)
        self.floor = float(optim.min_lr)
        self.warmup = int(optim.warmup_steps)
        self.decay = int(optim.decay_steps)
        self.total_steps = int(total_steps)
        self._validate()

    def _validate(self) -> None:
        if self.kind not in ("constant", "cosine", "wsd"):
            raise ValueError(f"optim.schedule must be constant/cosine/wsd, got {self.kind!r}")
        if self.peak < 0 or self.floor < 0 or self.floor > self.peak:
            raise ValueError(f"need 0 <= optim.min_lr ({self.floor}) <= optim.lr ({self.peak})")
        if self.warmup < 0 or self.decay < 0 or self.total_steps < 0:
            raise ValueError(
                f"optim.warmup_steps ({self.warmup}), optim.decay_steps ({self.decay}) and "
                f"train.steps ({self.total_steps}) must be >= 0"
            )
        if self.kind == "cosine" and self.total_steps > 0 and self._cosine_length() < 1:
            raise ValueError(
                f"optim.schedule=cosine with optim.decay_steps=0 decays until train.steps "
                f"({self.total_steps}), which is not after optim.warmup_steps ({self.warmup})"
            )
        if self.kind == "wsd" and self.warmup + self.decay > self.total_steps:
            raise ValueError(
                f"optim.schedule=wsd: optim.warmup_steps ({self.warmup}) + optim.decay_steps "
                f"({self.decay}) exceed train.steps ({self.total_steps})"
            )

    def _cosine_length(self) -> int:
        return self.decay if self.decay > 0 else self.total_steps - self.warmup

    def lr(self, step: int) -> float:
        """Learning rate of the update taken when `step` updates have already been applied."""
        if step < 0:
            raise ValueError(f"LRSchedule.lr: step must be >= 0, got {step}")
        n = step + 1
        if n <= self.warmup:
            return self.peak * n / self.warmup
        if self.kind == "cosine":
            p = min(max((n - self.warmup) / self._cosine_length(), 0.0), 1.0)
            return self.floor + (self.peak - self.floor) * 0.5 * (1.0 + math.cos(math.pi * p))
        if self.kind == "wsd" and self.decay > 0:
            decay_start = self.total_steps - self.decay
            if n > decay_start:
                p = min((n - decay_start) / self.decay, 1.0)
                return self.peak + (self.floor - self.peak) * p
        return self.peak

    def apply(self, optimizer: Any, step: int) -> float:
        """Set lr(step) on every param group of a Megatron or plain torch optimizer; return it.

        MegatronOptimizer and ChainedOptimizer expose `.param_groups` (the groups of the wrapped
        torch optimizers, shared by reference), so writing the groups updates the real optimizer."""
        groups = getattr(optimizer, "param_groups", None)
        if groups is None:
            raise TypeError(f"LRSchedule.apply: {type(optimizer).__name__} has no param_groups")
        value = self.lr(step)
        for group in groups:
            group["lr"] = value
        return value

    def state_dict(self) -> dict:
        return {
            "schedule": self.kind,
            "lr": self.peak,
            "min_lr": self.floor,
            "warmup_steps": self.warmup,
            "decay_steps": self.decay,
            "total_steps": self.total_steps,
        }

    def load_state_dict(self, state: dict) -> dict[str, tuple[Any, Any]]:
        """Compare a checkpoint's record with this schedule; return {key: (saved, current)} of the
        differences. Nothing is taken over: the current config is the schedule from here on."""
        unknown = sorted(set(state) - set(_STATE_KEYS))
        if unknown:
            raise ValueError(f"LRSchedule.load_state_dict: unknown keys {unknown}")
        current = self.state_dict()
        changed = {k: (state[k], current[k]) for k in _STATE_KEYS if k in state and state[k] != current[k]}
        if changed:
            diff = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
            get_logger().info(f"LR schedule differs from the checkpoint's ({diff}); using the current config")
        return changed
