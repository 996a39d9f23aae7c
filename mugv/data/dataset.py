"""Builds LatentBatches from BatchRequests (runs inside DataLoader workers).

Bad samples: a planned sample whose files are missing, unreadable, of the wrong shape or (with
check_finite) non-finite is skipped, logged and listed in `batch.skipped` (once per planned
occurrence, so over an epoch the count is exactly the number of bad samples). The batch is
REFILLED with other samples of the same bucket, drawn deterministically (seeded by the stream
index); a failed draw is logged but not counted again; after max(8, 2B) draws the batch comes
out smaller. If nothing of the bucket is readable, the batch becomes one sample drawn from the
whole dataset (another bucket); only if that fails too does BadDataError stop the run.
Counting and the bad-fraction limit live in mugv.data.loader (the main process), which sees
every batch's `skipped` list.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import get_worker_info

from mugv.data.batch import LatentBatch
from mugv.data.config import DataConfig
from mugv.data.reader import TensorReader
from mugv.data.sampler import BatchRequest
from mugv.data.store import SampleRecord
from mugv.utils.logging import get_logger

log = get_logger("data")


class BadDataError(RuntimeError):
    """Too much of the data is unreadable to go on."""


class LatentDataset:
    def __init__(self, records: list[SampleRecord], cfg: DataConfig):
        self.records, self.cfg = records, cfg
        self.reader = TensorReader(cfg.open_files, cfg.release_vae_stats)
        by_bucket: dict[str, list[int]] = {}
        for i, r in enumerate(records):
            by_bucket.setdefault(r.bucket, []).append(i)
        self.by_bucket = {k: np.array(v) for k, v in by_bucket.items()}
        self.known_bad: set[int] = set()  # per worker process

    def __len__(self) -> int:
        return len(self.records)

    def _load_into(self, i: int, out: torch.Tensor):
        """Latent of record i into `out`; -> (y, mask), or None if the sample is bad."""
        rec = self.records[i]
        try:
            y, mask = self.reader.load_into(rec, out)
            # a sum is non-finite iff a value is (or the sum overflows, which latents never do)
            if self.cfg.check_finite and not (torch.isfinite(out.sum()) and torch.isfinite(y.sum())):
                raise ValueError("non-finite values")
            return y, mask
        except Exception as err:  # noqa: BLE001 - any failure makes the sample bad, never the step
            self.known_bad.add(i)
            log.warning(f"bad sample {rec.id} ({rec.latent_file}): {type(err).__name__}: {err}")
            return None

    @staticmethod
    def _alloc(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """In a worker, allocated in shared memory so handing the batch over copies nothing."""
        out = torch.empty(shape, dtype=dtype)
        return out.share_memory_() if get_worker_info() is not None else out

    def _buffer(self, b: int, rec: SampleRecord) -> torch.Tensor:
        return self._alloc(b, rec.channels, *rec.shape)  # [B, C, T, H, W]

    def __getitem__(self, req: BatchRequest) -> LatentBatch:
        latents = self._buffer(len(req.indices), self.records[req.indices[0]])
        loaded, skipped, lost_tasks = [], [], []  # loaded: (record index, task, y, mask)
        for i, task in zip(req.indices, req.tasks, strict=True):
            text = self._load_into(i, latents[len(loaded)]) if i not in self.known_bad else None
            if text is None:
                skipped.append(self.records[i].id)
                lost_tasks.append(task)
            else:
                loaded.append((i, task, *text))
        if lost_tasks:
            self._refill(req, latents, loaded, lost_tasks)
        bucket = req.bucket
        if not loaded:
            latents, loaded = self._fallback(req)
            bucket = self.records[loaded[0][0]].bucket
        return self._collate(req, bucket, latents[: len(loaded)], loaded, skipped)

    def _refill(self, req: BatchRequest, latents: torch.Tensor, loaded: list, lost_tasks: list[str]) -> None:
        """Replace the lost samples by random others of the bucket (in place)."""
        rng = np.random.default_rng([self.cfg.seed, req.stream_index])
        pool = self.by_bucket[req.bucket]
        for _ in range(max(8, 2 * len(req.indices))):
            if not lost_tasks:
                return
            i = int(pool[rng.integers(len(pool))])
            if i in self.known_bad or any(i == entry[0] for entry in loaded):
                continue
            text = self._load_into(i, latents[len(loaded)])
            if text is not None:
                loaded.append((i, lost_tasks.pop(0), *text))
        if lost_tasks:
            log.warning(
                f"batch {req.stream_index} ({req.bucket}) comes out with {len(loaded)} of "
                f"{len(req.indices)} samples: no readable replacement found"
            )

    def _fallback(self, req: BatchRequest) -> tuple[torch.Tensor, list]:
        """A one-sample batch from anywhere in the data, for a batch whose bucket gave nothing."""
        rng = np.random.default_rng([self.cfg.seed, req.stream_index, 1])
        for _ in range(32):
            i = int(rng.integers(len(self.records)))
            if i in self.known_bad:
                continue
            latents = self._buffer(1, self.records[i])
            text = self._load_into(i, latents[0])
            if text is not None:
                log.warning(
                    f"batch {req.stream_index}: nothing readable in bucket {req.bucket}; "
                    f"using one sample of bucket {self.records[i].bucket}"
                )
                return latents, [(i, "t2i" if self.records[i].shape[0] == 1 else "t2v", *text)]
        raise BadDataError(
            f"batch {req.stream_index}: no readable sample in bucket {req.bucket} nor in 32 random "
            f"draws from the whole dataset; run `mugv data check`"
        )

    def _collate(
        self, req: BatchRequest, bucket: str, latents: torch.Tensor, loaded: list, skipped: list[str]
    ):
        recs = [self.records[i] for i, _, _, _ in loaded]
        b, t = latents.shape[0], latents.shape[2]
        lengths = [min(y.shape[0], self.cfg.text_len or y.shape[0]) for _, _, y, _ in loaded]
        L = self.cfg.text_len or max(lengths)
        y = self._alloc(b, 1, L, loaded[0][2].shape[1]).zero_()
        mask = torch.zeros(b, L, dtype=torch.bool)
        for k, (_, _, yk, mk) in enumerate(loaded):
            y[k, 0, : lengths[k]] = yk[: lengths[k]]
            mask[k, : lengths[k]] = mk[: lengths[k]]
        tasks = [task for _, task, _, _ in loaded]
        x_mask = torch.ones(b, t, dtype=torch.bool)
        for k, task in enumerate(tasks):
            if task == "i2v":
                x_mask[k, 0] = False  # the reference frame stays clean
        return LatentBatch(
            latents=latents,
            y=y,
            mask=mask,
            x_mask=x_mask,
            fps=torch.tensor([r.fps for r in recs], dtype=torch.float32),
            frame_indices=torch.arange(t + 2, dtype=torch.long).expand(b, t + 2).clone(),
            pixel_size=torch.tensor([[r.height, r.width] for r in recs], dtype=torch.long),
            tasks=tasks,
            bucket=bucket,
            ids=[r.id for r in recs],
            skipped=skipped,
            planned=len(req.indices),
            stream_index=req.stream_index,
        )
