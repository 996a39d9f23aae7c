"""Deterministic, resumable sampler of packed micro-batches balanced over data parallelism
(data.packing).

The sample stream: epoch e (seeded by (seed, e)) draws each bucket's samples per epoch (the same
mixing targets and task assignment as the bucket sampler, mugv.data.sampler) and shuffles them
all together; the stream is epochs 0, 1, 2, ... concatenated, sample q being epoch q // E,
position q % E (E samples an epoch).

One training step (W data-parallel ranks x M micro-batches) is planned at a time, the same on
every rank, from a small state: the stream position p of the next fresh sample, the samples
deferred so far with the steps each has waited, and the count of micro-batches issued so far
(their stream indices). The pool of the step is the deferred samples plus fresh ones from p
until it holds 1.25x the tokens the step can take; mugv.data.packing fills W*M micro-batches up
to the token budget and deals them so that every rank has the same model FLOPs (the `cost` of a
latent shape, from the trainer: mugv.models.flops); what is left over is deferred. A sample
that waited MAX_WAIT (4) steps is placed first, whatever the balance, so over any window of
more than a few steps the task and bucket mix is the stream's. The step is a function of
(state, W): a resume continues exactly, and a resume with another DP size plans the remaining
stream for the new W -- no sample repeated or skipped.

The sampler yields this rank's M PackedRequests per step (each a BatchRequest per bucket in the
micro-batch); the loader reports consumption with mark_consumed(stream_index), and the state
moves to the step's end when the step's last micro-batch was consumed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from mugv.data.buckets import num_tokens
from mugv.data.config import DataConfig
from mugv.data.packing import Item, StepPlan, plan_step
from mugv.data.sampler import BatchRequest, MixedSampler
from mugv.utils.logging import get_logger

POOL = 1.25  # a step's pool holds this many times the tokens it can take
MAX_WAIT = 4  # steps a sample may be deferred; then it is placed whatever the balance
TASKS = ("t2i", "t2v", "i2v")
log = get_logger("data")


@dataclass(frozen=True)
class PackedRequest:
    stream_index: int  # unique per micro-batch (seeds its noise)
    parts: tuple[BatchRequest, ...]  # one per bucket in the micro-batch


@dataclass(frozen=True)
class PlanState:
    position: int = 0  # stream index of the next fresh sample
    deferred: tuple[tuple[int, int], ...] = ()  # (stream index, steps it waited) of samples left over
    issued: int = 0  # micro-batches issued by all ranks so far


def token_cost(t: int, h: int, w: int) -> float:
    """Cost of a latent when none is given: its tokens (balances fill, not attention)."""
    return float(num_tokens(t, h, w))


class PackedBatchSampler(MixedSampler):
    def __init__(
        self,
        buckets: list[str],
        native_tasks: list[str],
        cfg: DataConfig,
        dp_rank: int = 0,
        dp_size: int = 1,
        microbatches: int = 1,
        cost: Callable[[int, int, int], float] | None = None,
    ):
        super().__init__(buckets, native_tasks, cfg, dp_rank, dp_size)
        if microbatches < 1:
            raise ValueError(f"microbatches = {microbatches} must be >= 1")
        self.microbatches, self.budget, self.max_samples = microbatches, cfg.token_budget, cfg.max_batch_size
        cost = cost or token_cost
        shapes = [tuple(int(v) for v in b.name.split("x")) for b in self.buckets]
        self.kind_tokens = [num_tokens(*s) for s in shapes]
        self.kind_cost = [float(cost(*s)) for s in shapes]
        self.epoch_samples = sum(self.targets)
        if self.epoch_samples == 0:
            raise ValueError("the mixing weights leave no samples in an epoch")
        self.start = self.consumed = PlanState()
        self._after: dict[int, PlanState] = {}  # stream index of this rank's last micro-batch of a step -> state after it
        self._epochs: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}

    # ------------------------------------------------------------ the sample stream

    def epoch(self, e: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(record index, task code (index into TASKS), bucket index) of every sample of epoch e, in order."""
        if e not in self._epochs:
            rng = np.random.default_rng([self.seed, e, 1])
            recs, tasks, kinds = [], [], []
            for k, (b, target) in enumerate(zip(self.buckets, self.targets, strict=True)):
                order, task = self._draw(rng, b, target)
                recs.append(order)
                tasks += [TASKS.index(t) for t in task]
                kinds.append(np.full(target, k))
            perm = rng.permutation(self.epoch_samples)
            self._epochs = {k: v for k, v in self._epochs.items() if k >= e - 1}  # keep two at most
            self._epochs[e] = (np.concatenate(recs)[perm], np.array(tasks)[perm], np.concatenate(kinds)[perm])
        return self._epochs[e]

    def sample(self, q: int) -> tuple[int, str, int]:
        """(record index, task, bucket index) of stream sample q."""
        recs, tasks, kinds = self.epoch(q // self.epoch_samples)
        p = q % self.epoch_samples
        return int(recs[p]), TASKS[tasks[p]], int(kinds[p])

    def _item(self, q: int) -> Item:
        k = self.sample(q)[2]
        return Item(q, self.kind_tokens[k], self.kind_cost[k], k)

    # ------------------------------------------------------------ planning

    def plan(self, state: PlanState, dp_size: int) -> tuple[StepPlan, PlanState]:
        """The step after `state` for `dp_size` ranks, and the state after it."""
        steps = dp_size * self.microbatches
        waited = dict(state.deferred)
        order = sorted(waited, key=lambda q: (-waited[q], q))  # the longest waiting first
        locked = sum(waited[q] >= MAX_WAIT for q in order)
        pool = [self._item(q) for q in order]
        tokens, q = sum(it.tokens for it in pool), state.position
        while tokens < POOL * steps * self.budget or len(pool) < steps:
            pool.append(self._item(q))
            tokens += pool[-1].tokens
            q += 1
        plan = plan_step(pool, locked, dp_size, self.microbatches, self.budget, self.max_samples)
        deferred = tuple((it.q, waited.get(it.q, 0) + 1) for it in plan.deferred)
        return plan, PlanState(q, deferred, state.issued + steps)

    def request(self, stream_index: int, items: list[Item]) -> PackedRequest:
        parts: dict[int, list[tuple[int, str]]] = {}
        for it in sorted(items, key=lambda it: (-it.tokens, it.kind, it.q)):
            rec, task, k = self.sample(it.q)
            parts.setdefault(k, []).append((rec, task))
        return PackedRequest(stream_index, tuple(
            BatchRequest(stream_index, self.buckets[k].name, tuple(r for r, _ in v), tuple(t for _, t in v))
            for k, v in parts.items()
        ))

    # ------------------------------------------------------------ iteration and state

    def __iter__(self):
        state, M = self.start, self.microbatches
        while True:
            plan, after = self.plan(state, self.dp_size)
            first = state.issued + self.dp_rank * M
            self._after[first + M - 1] = after
            for m, b in enumerate(plan.ranks[self.dp_rank]):
                yield self.request(first + m, b.items)
            state = after

    def mark_consumed(self, stream_index: int) -> None:
        """This rank consumed micro-batch `stream_index`; at a step's last one, so did every rank."""
        after = self._after.pop(stream_index, None)
        if after is not None:
            self.consumed = after
            self._after = {g: s for g, s in self._after.items() if g > stream_index}

    def state_dict(self) -> dict:
        s = self.consumed
        return {"seed": self.seed, "packed": True, "position": s.position, "deferred": [list(d) for d in s.deferred],
                "issued": s.issued, "epoch_samples": self.epoch_samples}

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            log.warning(f"data sampler seed changed on resume: {state['seed']} -> {self.seed} (using the checkpoint's)")
            self.seed = int(state["seed"])
            self._epochs = {}
        if not state.get("packed"):  # a bucket sampler's checkpoint (data.packing was off)
            epoch = int(state["epoch"]) + 1
            log.warning(f"the checkpoint's data position is the bucket sampler's: packing resumes at epoch {epoch}")
            restored = PlanState(epoch * self.epoch_samples, (), int(state["epoch"]) * int(state["epoch_batches"])
                                 + int(state["position"]))
        elif int(state["epoch_samples"]) != self.epoch_samples:
            epoch = int(state["position"]) // int(state["epoch_samples"]) + 1
            log.warning(f"data changed since the checkpoint ({state['epoch_samples']} -> {self.epoch_samples} samples "
                        f"per epoch): resuming at the start of epoch {epoch}")
            restored = PlanState(epoch * self.epoch_samples, (), int(state["issued"]))
        else:
            deferred = tuple((int(q), int(w)) for q, w in state["deferred"])
            restored = PlanState(int(state["position"]), deferred, int(state["issued"]))
        self.start = self.consumed = restored
        self._after = {}
