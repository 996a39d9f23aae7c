"""`LatentLoader`: the trainer's data source (an endless stream of LatentBatches for one DP rank).

    loader = LatentLoader(cfg, dp_rank, dp_size)
    it = iter(loader)
    batch = next(it)                   # LatentBatch, see mugv.data.batch
    ckpt["data"] = loader.state_dict() # small dict: sampler position + bad-sample counters
    loader.load_state_dict(ckpt["data"]); it = iter(loader)   # continues exactly there
    loader.metrics()                   # {"data/bad_samples": ..., "data/bad_fraction": ...}
    loader.quarantine([(id, reason), ...])   # never draw these (e.g. the run's quarantine list)
    loader.take_new_bad()              # bad samples found since the last call, to share and list

A pairs dataset (`mugv prep --pairs`) is batched whole pairs at a time (mugv.data.pairs;
`loader.paired`).

Bad samples (see mugv.data.dataset) are counted here once by id: `bad_ids` holds every known bad
sample (found here, or quarantined from elsewhere) with its reason, and the dataset's shared
flags keep them from being drawn again. Past `max_bad_fraction` of the attempted samples (bad
ones found by this loader; once `bad_grace_samples` were attempted) the run stops with
BadDataError.

Batches live in reused buffers (mugv.data.shm_pool; with workers, shared memory): a buffer is
reused only once no tensor of the batch built on it is referenced, so batches may be kept as
long as needed. With pin_memory (and CUDA present) each batch is copied to pinned memory here.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch.utils.data import DataLoader

from mugv.data.batch import LatentBatch, PackedBatch
from mugv.data.config import DataConfig
from mugv.data.dataset import BadDataError, LatentDataset
from mugv.data.packed_sampler import PackedBatchSampler
from mugv.data.pairs import PairDataset, pair_config
from mugv.data.sampler import BucketBatchSampler
from mugv.data.shm_pool import Parcel, Receiver, new_flags
from mugv.data.store import SampleRecord, read_records, read_text_null
from mugv.utils.logging import get_logger

log = get_logger("data")


PACKED_PARTS = 4  # buffers reserved per packed micro-batch, in parts (buckets); more are taken as needed


def _as_is(x):
    return x


def load_all_records(cfg: DataConfig) -> tuple[list[SampleRecord], list[tuple[str, str]]]:
    """Records of every path in cfg.paths (in that order), and rows that could not be indexed."""
    if not cfg.paths:
        raise ValueError("DataConfig.paths is empty: give dataset directories or release CSVs")
    records, errors, seen = [], [], set()
    for path in cfg.paths:
        recs, errs = read_records(path, cfg.default_fps)
        for sid, why in errs:
            log.warning(f"{path}: skipping sample {sid}: {why}")
        dup = [r.id for r in recs if r.id in seen]
        if dup:
            log.warning(f"{path}: {len(dup)} sample id(s) also in an earlier path, e.g. {dup[0]!r}")
        seen.update(r.id for r in recs)
        records += recs
        errors += errs
    if not records:
        raise ValueError(f"no readable samples in {cfg.paths}")
    return records, errors


class LatentLoader:
    def __init__(self, cfg: DataConfig, dp_rank: int = 0, dp_size: int = 1, microbatches: int = 1,
                 cost: Callable[[int, int, int], float] | None = None):
        """microbatches: per rank and step; cost: model FLOPs of a latent (T, H, W) -- both used by
        the packed sampler only (data.packing), which plans whole steps balanced over DP."""
        self.cfg = cfg
        self.records, index_errors = load_all_records(cfg)
        self.paired = any(r.role for r in self.records)  # preference pairs (mugv.data.pairs)
        if self.paired:
            if cfg.packing:
                raise ValueError(f"data.paths {cfg.paths}: a preference-pairs dataset is batched by bucket, whole "
                                 "pairs at a time: set data.packing=false")
            self.dataset = PairDataset(self.records, cfg)
            units, unit_cfg = self.dataset.unit_records(), pair_config(cfg)
        else:
            self.dataset, units, unit_cfg = LatentDataset(self.records, cfg), self.records, cfg
        args = ([r.bucket for r in units], [r.task for r in units], unit_cfg, dp_rank, dp_size)
        self.sampler = PackedBatchSampler(*args, microbatches, cost) if cfg.packing else BucketBatchSampler(*args)
        self.dataset.bad_flags.share_memory_()  # written by the workers, read by all of them
        self.index_errors = len(index_errors)
        self.bad_samples = len(index_errors)  # found by this loader (rows that could not be indexed too)
        self.attempted = len(index_errors)
        self.bad_ids: dict[str, str] = {}  # every known bad sample id -> why
        self.new_bad: list[tuple[str, str]] = []
        self._index: dict[str, int] | None = None
        self.text_embeddings = self._text_embeddings()
        self.receiver: Receiver | None = None

    def _text_embeddings(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Dataset-level {"null": (y [L, Ct], mask [L]), "negative": ...} of the first path that has them."""
        for path in self.cfg.paths:
            if os.path.isdir(path):
                emb = read_text_null(path)
                if emb:
                    return emb
        return {}

    def __iter__(self):
        self.sampler.start = self.sampler.consumed
        kwargs, flags = {}, None
        if self.cfg.num_workers > 0:
            kwargs = {"prefetch_factor": self.cfg.prefetch_factor, "persistent_workers": False}
            per_batch = 2 * (PACKED_PARTS if self.cfg.packing else 1)  # 2 segments a part
            flags = new_flags(self.cfg.num_workers, per_batch * self.cfg.pooled_batches)
        self.dataset.set_pool_flags(flags)
        self.receiver = receiver = Receiver(flags)  # its counts show how often buffers were reused
        pin = self.cfg.pin_memory and torch.cuda.is_available()
        dl = DataLoader(
            self.dataset,
            batch_size=None,
            sampler=self.sampler,
            num_workers=self.cfg.num_workers,
            collate_fn=_as_is,
            **kwargs,
        )
        for item in dl:
            batch = receiver.unpack(item) if isinstance(item, Parcel) else item
            if isinstance(batch, PackedBatch):
                batch.parts = [receiver.unpack(p) if isinstance(p, Parcel) else p for p in batch.parts]
            if pin:
                batch = batch.pin_memory()
            self._account(batch)
            self.sampler.mark_consumed(batch.stream_index)
            yield batch

    def _account(self, batch: LatentBatch) -> None:
        for sid, why in batch.bad:
            if sid not in self.bad_ids:
                self.bad_ids[sid] = why
                self.bad_samples += 1
                self.new_bad.append((sid, why))
        self.attempted += batch.planned
        frac = self.bad_samples / max(1, self.attempted)
        if self.attempted >= self.cfg.bad_grace_samples and frac > self.cfg.max_bad_fraction:
            raise BadDataError(
                f"{self.bad_samples} of {self.attempted} samples were bad ({frac:.2%} > max_bad_fraction "
                f"{self.cfg.max_bad_fraction:.2%}); latest: {batch.skipped[:3] or 'none in this batch'}. "
                f"Run `mugv data check` on {self.cfg.paths}"
            )

    def quarantine(self, items) -> None:
        """Never draw these samples ((id, reason) pairs; unknown ids are ignored)."""
        if self._index is None:
            self._index = {r.id: i for i, r in enumerate(self.records)}
        for sid, why in items:
            i = self._index.get(sid)
            if i is not None:
                self.dataset.bad_flags[i] = 1
                self.bad_ids.setdefault(sid, why)

    def take_new_bad(self) -> list[tuple[str, str]]:
        out, self.new_bad = self.new_bad, []
        return out

    def metrics(self) -> dict[str, float]:
        return {
            "data/bad_samples": float(len(self.bad_ids) + self.index_errors),
            "data/attempted_samples": float(self.attempted),
            "data/bad_fraction": self.bad_samples / max(1, self.attempted),
        }

    def state_dict(self) -> dict:
        return {
            "sampler": self.sampler.state_dict(),
            "bad_samples": self.bad_samples,
            "attempted": self.attempted,
        }

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state["sampler"])
        self.bad_samples, self.attempted = int(state["bad_samples"]), int(state["attempted"])

    def set_microbatches(self, microbatches: int) -> None:
        """Micro-batches per rank and step from now on (a resume that keeps the global batch at
        another DP size); the packed sampler plans whole steps with it."""
        if isinstance(self.sampler, PackedBatchSampler):
            self.sampler.microbatches = microbatches

    @property
    def epoch_batches(self) -> int:
        """Micro-batches per epoch (bucket sampler; packed: planned per step, not per epoch)."""
        return self.sampler.epoch_batches
