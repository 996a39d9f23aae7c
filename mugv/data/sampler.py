"""Deterministic, resumable bucket batch sampler for data parallelism.

The global batch stream: epoch e (seeded by (seed, e)) is a list of E micro-batches, each from
one latent bucket (sizes from the token budget), built by
  1. per bucket, a target sample count from the mixing ratios (natural counts by default),
     filled from fresh permutations of the bucket's samples (repeats only if the target exceeds
     the bucket size);
  2. cutting each bucket's list into micro-batches (the last one may be smaller);
  3. assigning tasks per sample (t2i for images; t2v, or i2v with the configured probability,
     for videos);
  4. shuffling the epoch's batches.
E depends only on the data and the config, not on the epoch. The stream is epochs 0, 1, 2, ...
concatenated; global micro-batch g is epoch g // E, position g % E.

DP rank r of W takes micro-batches start + r, start + r + W, ... where start is the resume point.
All ranks step together, so after each rank consumed k batches the stream is consumed up to
start + k * W: that number (as epoch, position) is the whole state. Resuming with another W
re-splits the remaining stream, so no micro-batch is repeated or skipped. Epochs flow into each
other without a gap (a round of W batches may straddle the boundary).

The sampler runs in the main process of a DataLoader (batch_size=None) and yields BatchRequest
index lists; the dataset builds batches from them in workers. Because workers prefetch, the
consumed position is reported by the consumer via `mark_consumed(stream_index)`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mugv.data.buckets import batch_size_for
from mugv.data.config import DataConfig, MixConfig
from mugv.utils.logging import get_logger

log = get_logger("data")


@dataclass(frozen=True)
class BatchRequest:
    stream_index: int  # global micro-batch index g
    bucket: str
    indices: tuple[int, ...]  # into the dataset's record list
    tasks: tuple[str, ...]


@dataclass(frozen=True)
class _Bucket:
    name: str
    indices: np.ndarray  # record indices in this bucket
    is_image: bool
    batch_size: int


class MixedSampler:
    """What both samplers share: the buckets of the records and each bucket's samples per epoch
    (mixing ratios), the task of a drawn sample, the data-parallel rank."""

    def __init__(
        self,
        buckets: list[str],
        native_tasks: list[str],
        cfg: DataConfig,
        dp_rank: int = 0,
        dp_size: int = 1,
    ):
        """buckets[i], native_tasks[i]: latent bucket name ("TxHxW") and task of record i."""
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} not in [0, {dp_size})")
        if not buckets:
            raise ValueError("no samples to sample from")
        self.seed, self.dp_rank, self.dp_size = cfg.seed, dp_rank, dp_size
        self.mix: MixConfig = cfg.mix
        self._native = np.array(native_tasks)
        groups: dict[str, list[int]] = {}
        for i, b in enumerate(buckets):
            groups.setdefault(b, []).append(i)
        self.buckets = []
        for name in sorted(groups):
            t, h, w = (int(v) for v in name.split("x"))
            bs = batch_size_for(t, h, w, cfg.token_budget, cfg.max_batch_size, cfg.batch_sizes)
            self.buckets.append(_Bucket(name, np.array(groups[name]), t == 1, bs))
        self.targets = self._targets()

    def _targets(self) -> list[int]:
        """Samples per bucket per epoch."""
        counts = np.array([len(b.indices) for b in self.buckets], dtype=np.float64)
        weights = counts * np.array([self.mix.bucket_weights.get(b.name, 1.0) for b in self.buckets])
        image = np.array([b.is_image for b in self.buckets])
        total = counts.sum()
        group_size = {True: counts[image].sum(), False: counts[~image].sum()}
        if self.mix.task_weights:
            tw = self.mix.task_weights
            share = {True: tw.get("t2i", 0.0), False: tw.get("t2v", 0.0) + tw.get("i2v", 0.0)}
            for g in (True, False):
                if share[g] > 0 and group_size[g] == 0:
                    log.warning(
                        f"mix.task_weights asks for {'images' if g else 'videos'} but the data has none"
                    )
                    share[g] = 0.0
            norm = share[True] + share[False]
            if norm <= 0:
                raise ValueError("mix.task_weights select no task present in the data")
            group_size = {g: total * share[g] / norm for g in (True, False)}
        targets = []
        for i, b in enumerate(self.buckets):
            in_group = weights[image == b.is_image].sum()
            targets.append(int(round(group_size[b.is_image] * weights[i] / in_group)) if in_group > 0 else 0)
        return targets

    def _i2v_probability(self) -> float:
        tw = self.mix.task_weights
        video = tw.get("t2v", 0.0) + tw.get("i2v", 0.0)
        return tw.get("i2v", 0.0) / video if video > 0 else 0.0

    def _draw(self, rng: np.random.Generator, b: _Bucket, target: int) -> tuple[np.ndarray, list[str]]:
        """`target` samples of bucket b (fresh permutations, repeats only past its size) and their tasks."""
        reps = -(-target // len(b.indices)) if target else 0
        order = np.concatenate([b.indices[rng.permutation(len(b.indices))] for _ in range(reps)] or [b.indices[:0]])
        order = order[:target]
        flip = rng.random(target) < self._i2v_probability()
        tasks = ["t2i" if b.is_image else ("i2v" if self._native[i] == "i2v" or f else "t2v")
                 for i, f in zip(order, flip, strict=True)]
        return order, tasks


class BucketBatchSampler(MixedSampler):
    def __init__(self, buckets: list[str], native_tasks: list[str], cfg: DataConfig, dp_rank: int = 0,
                 dp_size: int = 1):
        super().__init__(buckets, native_tasks, cfg, dp_rank, dp_size)
        self.epoch_batches = sum(-(-n // b.batch_size) for n, b in zip(self.targets, self.buckets, strict=True))
        if self.epoch_batches == 0:
            raise ValueError("the mixing weights leave no batches in an epoch")
        self.start = 0  # global index of the first batch this iterator yields (resume point)
        self.consumed = 0  # global index up to which all ranks consumed
        self._plan_cache: tuple[int, list[BatchRequest]] | None = None

    # ------------------------------------------------------------ epoch plan

    def epoch_plan(self, epoch: int) -> list[BatchRequest]:
        """All micro-batches of one epoch in stream order (stream_index = epoch * E + position)."""
        if self._plan_cache is not None and self._plan_cache[0] == epoch:
            return self._plan_cache[1]
        rng = np.random.default_rng([self.seed, epoch])
        raw = []
        for b, target in zip(self.buckets, self.targets, strict=True):
            order, tasks = self._draw(rng, b, target)
            for s in range(0, target, b.batch_size):
                idx = order[s : s + b.batch_size]
                raw.append((b.name, tuple(int(i) for i in idx), tuple(tasks[s : s + b.batch_size])))
        perm = rng.permutation(len(raw))
        plan = [BatchRequest(epoch * self.epoch_batches + p, *raw[j]) for p, j in enumerate(perm)]
        self._plan_cache = (epoch, plan)
        return plan

    def request(self, g: int) -> BatchRequest:
        return self.epoch_plan(g // self.epoch_batches)[g % self.epoch_batches]

    # ------------------------------------------------------------ iteration and state

    def __iter__(self):
        g = self.start + self.dp_rank
        while True:
            yield self.request(g)
            g += self.dp_size

    def mark_consumed(self, stream_index: int) -> None:
        """This rank consumed batch `stream_index`; so did every rank in its round."""
        self.consumed = stream_index - self.dp_rank + self.dp_size

    def state_dict(self) -> dict:
        epoch, position = divmod(self.consumed, self.epoch_batches)
        return {
            "seed": self.seed,
            "epoch": int(epoch),
            "position": int(position),
            "epoch_batches": self.epoch_batches,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["seed"] != self.seed:
            log.warning(
                f"data sampler seed changed on resume: {state['seed']} -> {self.seed} (using the checkpoint's)"
            )
            self.seed = int(state["seed"])
            self._plan_cache = None
        position = int(state["position"])
        if state.get("epoch_batches", self.epoch_batches) != self.epoch_batches:
            log.warning(
                f"data changed since the checkpoint ({state['epoch_batches']} -> {self.epoch_batches} batches per "
                f"epoch): resuming at the start of epoch {state['epoch'] + 1}"
            )
            state = {**state, "epoch": state["epoch"] + 1}
            position = 0
        self.start = self.consumed = int(state["epoch"]) * self.epoch_batches + position
