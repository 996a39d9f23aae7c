"""Preference pairs: a latent dataset of (chosen, rejected) clips, batched whole pairs at a time.

On disk a pairs dataset is a mugv dataset (mugv.data.store) written by `mugv prep --pairs`: its
dataset.json says "pairs": true, and each manifest row carries `pair` (the pair's id) and `role`
("chosen" or "rejected"). Both clips of a pair are one prep item (so they are in the same shard,
written or not together), share one stored caption and have the same latent bucket.

The loader (mugv.data.loader) plans micro-batches over pairs instead of samples, with the bucket
sampler (mugv.data.sampler) unchanged: each pair is one unit of its bucket and counts twice
against data.token_budget, data.max_batch_size and data.batch_sizes (`pair_config`). PairDataset
then loads both clips of each planned pair next to each other: batch sample 2k is pair k's chosen
clip, 2k + 1 its rejected clip (`batch.paired`), so a pair always lands in one micro-batch.

Bad samples: a pair with an unreadable clip is left out whole, its bad clip(s) listed in
`batch.skipped` (and `batch.bad`, flagged so that they are not drawn again), and replaced by
another pair of its bucket (deterministic draws, as mugv.data.dataset refills samples); a bucket
with nothing readable gives an empty batch, whose step the trainer skips.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mugv.data.config import DataConfig
from mugv.data.dataset import LatentDataset
from mugv.data.sampler import BatchRequest
from mugv.data.store import SampleRecord
from mugv.utils.logging import get_logger

log = get_logger("data")

ROLES = ("chosen", "rejected")


def pair_problems(records: list[SampleRecord]) -> tuple[list[tuple[int, int]], list[str]]:
    """([(chosen index, rejected index)] in chosen-id order, problems) of records that are pairs."""
    by_pair: dict[str, dict[str, list[int]]] = {}
    problems = []
    for i, r in enumerate(records):
        if r.role not in ROLES or not r.pair:
            problems.append(f"{r.id}: not part of a preference pair (pair {r.pair!r}, role {r.role!r}); "
                            "a pairs dataset cannot be mixed with plain samples")
            continue
        by_pair.setdefault(r.pair, {}).setdefault(r.role, []).append(i)
    pairs = []
    for pid, roles in by_pair.items():
        counts = {role: len(roles.get(role, [])) for role in ROLES}
        if counts != {"chosen": 1, "rejected": 1}:
            problems.append(f"pair {pid!r}: {counts['chosen']} chosen and {counts['rejected']} rejected clips, expected 1 and 1")
            continue
        c, r = records[roles["chosen"][0]], records[roles["rejected"][0]]
        if c.bucket != r.bucket:
            problems.append(f"pair {pid!r}: chosen clip is {c.bucket}, rejected clip {r.bucket}; a pair shares one bucket")
        elif c.task != r.task:
            problems.append(f"pair {pid!r}: chosen clip is {c.task}, rejected clip {r.task}")
        elif c.caption != r.caption:
            problems.append(f"pair {pid!r}: the clips have different captions ({c.caption!r}, {r.caption!r})")
        else:
            pairs.append((roles["chosen"][0], roles["rejected"][0]))
    pairs.sort(key=lambda p: records[p[0]].id)
    return pairs, problems


def pair_config(cfg: DataConfig) -> DataConfig:
    """The sampler's view of cfg with pairs as units: every budget halved (a pair is two clips)."""
    return dataclasses.replace(
        cfg, token_budget=max(1, cfg.token_budget // 2), max_batch_size=max(1, cfg.max_batch_size // 2),
        batch_sizes={k: max(1, v // 2) for k, v in cfg.batch_sizes.items()},
    )


class PairDataset(LatentDataset):
    """Builds paired LatentBatches from BatchRequests over pairs (request indices are pair indices)."""

    def __init__(self, records: list[SampleRecord], cfg: DataConfig):
        super().__init__(records, cfg)
        self.pairs, problems = pair_problems(records)
        if problems:
            raise ValueError(f"data.paths {cfg.paths}: bad preference pairs ({len(problems)}), e.g. {problems[0]}; "
                             "run `mugv data check`")
        by_bucket: dict[str, list[int]] = {}
        for p, (c, _) in enumerate(self.pairs):
            by_bucket.setdefault(records[c].bucket, []).append(p)
        self.pairs_by_bucket = {k: np.array(v) for k, v in by_bucket.items()}

    def unit_records(self) -> list[SampleRecord]:
        """One record per pair (its chosen clip): what the sampler plans with."""
        return [self.records[c] for c, _ in self.pairs]

    def __len__(self) -> int:
        return len(self.pairs)

    def _load_pair(self, p: int, task: str, latents, loaded: list, skipped: list[str] | None) -> bool:
        """Both clips of pair p into the next two rows of `latents`; False (and the bad ids in
        `skipped`, unless None) if either is unreadable."""
        k, texts = len(loaded), []
        for j, i in enumerate(self.pairs[p]):
            text = self._load_into(i, latents[k + j]) if not self.bad_flags[i] else None
            if text is None and skipped is not None:
                skipped.append(self.records[i].id)
            texts.append(text)
        if any(t is None for t in texts):
            return False
        loaded += [(i, task, *t) for i, t in zip(self.pairs[p], texts, strict=True)]
        return True

    def __getitem__(self, req: BatchRequest):
        segs = []
        self._found = []
        first = self.records[self.pairs[req.indices[0]][0]]
        latents = self._buffer(2 * len(req.indices), first, segs)  # [2P, C, T, H, W]
        loaded, skipped, lost = [], [], []
        for p, task in zip(req.indices, req.tasks, strict=True):
            if not self._load_pair(p, task, latents, loaded, skipped):
                lost.append(task)
        if lost:
            self._refill_pairs(req, req.bucket, latents, loaded, lost)
        if loaded:
            batch = self._collate(req, req.bucket, latents[: len(loaded)], loaded, skipped, segs)
        else:
            self._give_back(segs)
            batch = self._empty(dataclasses.replace(req, indices=self.pairs[req.indices[0]]), skipped)
        return self._ship(dataclasses.replace(batch, planned=2 * len(req.indices), paired=True), segs)

    def _refill_pairs(self, req: BatchRequest, bucket: str, latents, loaded: list, lost: list[str]) -> None:
        rng = np.random.default_rng([self.cfg.seed, req.stream_index])
        pool = self.pairs_by_bucket[bucket]
        for _ in range(max(8, 2 * len(req.indices))):
            if not lost:
                return
            p = int(pool[rng.integers(len(pool))])
            if any(self.bad_flags[i] for i in self.pairs[p]) or any(self.pairs[p][0] == e[0] for e in loaded):
                continue
            if self._load_pair(p, lost[0], latents, loaded, None):
                lost.pop(0)
        if lost:
                log.warning(f"batch {req.stream_index} ({bucket}) comes out with {len(loaded) // 2} of "
                        f"{len(req.indices)} pairs: no readable replacement found")
