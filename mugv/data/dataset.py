"""Builds LatentBatches from BatchRequests (runs inside DataLoader workers).

Bad samples: a planned sample whose files are missing, unreadable, of the wrong shape or dtype
(a latent or text stored as integers) or (with check_finite) non-finite is skipped and listed in
`batch.skipped`; every sample found bad while building the batch (planned, or drawn as a
replacement) is reported once in `batch.bad` as (id, reason) and flagged in `bad_flags`, a
byte per record shared by the loader's workers, so that no worker draws it again (the loader
also flags the run's quarantine list there). The batch is REFILLED with other samples of the
same bucket, each taking the task of a lost one (the batch keeps its task mix), drawn
deterministically (seeded by the stream index); after max(8, 2B) draws the batch comes out
smaller. If nothing of the bucket is readable the batch comes out EMPTY (0 samples): the
trainer skips the step and counts it; it never reaches the model. Counting, the quarantine and
the bad-fraction limit live in mugv.data.loader (the main process), which sees every batch.

A batch's tensors live in two reused buffers (latents; text and the small fields) of the
process's SegmentPool (mugv.data.shm_pool). In a worker that the loader gave `pool_flags`, they
are shared memory and the worker returns a Parcel, which the loader unpacks; in the main process
the batch is built directly.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import get_worker_info

from mugv.data.batch import TENSOR_FIELDS, LatentBatch, PackedBatch
from mugv.data.config import DataConfig
from mugv.data.packed_sampler import PackedRequest
from mugv.data.reader import TensorReader
from mugv.data.sampler import BatchRequest
from mugv.data.shm_pool import Parcel, Segment, SegmentPool, carve, carved_nbytes, pack
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
        self.bad_flags = torch.zeros(len(records), dtype=torch.uint8)  # 1 = bad (the loader shares it)
        self._found: list[tuple[str, str]] = []  # (id, reason) found bad while building the current batch
        self.pool_flags: torch.Tensor | None = None  # set by the loader before its workers start
        self._pool: SegmentPool | None = None  # made in the process that uses it

    def set_pool_flags(self, flags: torch.Tensor | None) -> None:
        """Before workers start: the shared [workers, slots] flags of their pools (or None)."""
        self.pool_flags, self._pool = flags, None

    def __getstate__(self):  # a pool never crosses process boundaries
        return {**self.__dict__, "_pool": None}

    def __len__(self) -> int:
        return len(self.records)

    def _load_into(self, i: int, out: torch.Tensor):
        """Latent of record i into `out`; -> (y, mask), or None if the sample is bad."""
        rec = self.records[i]
        try:
            y, mask = self.reader.load_into(rec, out)
            # a sum is non-finite iff a value is (or the sum overflows, which latents never do)
            if self.cfg.check_finite and not (_all_finite(out) and _all_finite(y)):
                raise ValueError("non-finite values")
            return y, mask
        except Exception as err:  # noqa: BLE001 - any failure makes the sample bad, never the step
            self.bad_flags[i] = 1
            why = f"{rec.latent_file}: {type(err).__name__}: {err}"
            self._found.append((rec.id, why))
            log.warning(f"bad sample {rec.id} ({why})")
            return None

    def _pool_here(self) -> SegmentPool:
        if self._pool is None:
            info = get_worker_info()
            if info is None:
                self._pool = SegmentPool(2 * self.cfg.pooled_batches)  # 2 segments a batch
            elif self.pool_flags is not None:
                self._pool = SegmentPool(self.pool_flags.shape[1], self.pool_flags, info.id)
            else:  # a worker of some other DataLoader: shared memory that is never reused
                self._pool = SegmentPool(0, torch.zeros(1, 0, dtype=torch.uint8))
        return self._pool

    def _alloc(
        self, specs: list[tuple[tuple[int, ...], torch.dtype]], segs: list[Segment], reserve: int = 0
    ) -> list[torch.Tensor]:
        """Tensors of the given (shape, dtype) in one buffer of the pool (appended to `segs`) of at
        least `reserve` bytes (so that batches of one bucket reuse one size of buffer)."""
        pool = self._pool_here()
        seg = pool.take(max(carved_nbytes(specs), reserve))
        segs.append(seg)
        return carve(seg.storage if pool.shared else pool.hand_out(seg), specs)

    def _give_back(self, segs: list[Segment]) -> None:
        for seg in segs:
            self._pool.release(seg)
        segs.clear()

    def _buffer(self, b: int, rec: SampleRecord, segs: list[Segment]) -> torch.Tensor:
        return self._alloc([((b, rec.channels, *rec.shape), torch.float32)], segs)[0]  # [B, C, T, H, W]

    def __getitem__(self, req: BatchRequest | PackedRequest) -> LatentBatch | PackedBatch | Parcel:
        if isinstance(req, PackedRequest):
            return self._packed(req)
        batch, segs = self._build(req)
        return self._ship(batch, segs)

    def _ship(self, batch: LatentBatch, segs: list[Segment]) -> LatentBatch | Parcel:
        """In a worker with a shared pool, the batch travels as a Parcel (an empty batch as is)."""
        if segs and self._pool.shared and self.pool_flags is not None:
            return pack(batch, TENSOR_FIELDS, segs, self._pool.worker)
        return batch

    def _packed(self, req: PackedRequest) -> PackedBatch:
        """One part per bucket, each built like a bucket batch (bad samples refilled from their own
        bucket, so the micro-batch keeps its tokens); a part with nothing readable is left out (its
        skipped and bad samples counted on the first part). A micro-batch left with no part comes
        out EMPTY (one part of 0 samples): the trainer skips the step. In a worker the parts travel
        as Parcels, which the loader unpacks."""
        built = [self._build(part) for part in req.parts]
        parts = [(b, segs) for b, segs in built if len(b)]
        lost = [b for b, _ in built if not len(b)]
        if not parts:
            parts, lost = [built[0]], lost[1:]
        head = parts[0][0]
        for b in lost:
            head.skipped.extend(b.skipped)
            head.bad.extend(b.bad)
            head.planned += b.planned
        return PackedBatch([self._ship(b, segs) for b, segs in parts], req.stream_index)

    def _build(self, req: BatchRequest) -> tuple[LatentBatch, list[Segment]]:
        """The batch of a request and the pool buffers it lives in (none for an empty batch)."""
        segs: list[Segment] = []
        self._found = []
        latents = self._buffer(len(req.indices), self.records[req.indices[0]], segs)
        loaded, skipped, lost_tasks = [], [], []  # loaded: (record index, task, y, mask)
        for i, task in zip(req.indices, req.tasks, strict=True):
            text = self._load_into(i, latents[len(loaded)]) if not self.bad_flags[i] else None
            if text is None:
                skipped.append(self.records[i].id)
                lost_tasks.append(task)
            else:
                loaded.append((i, task, *text))
        if lost_tasks:
            self._refill(req, latents, loaded, lost_tasks)
        if not loaded:
            self._give_back(segs)
            return self._empty(req, skipped), []
        return self._collate(req, req.bucket, latents[: len(loaded)], loaded, skipped, segs), segs

    def _refill(self, req: BatchRequest, latents: torch.Tensor, loaded: list, lost_tasks: list[str]) -> None:
        """Replace the lost samples by random others of the bucket, each with a lost one's task (in place)."""
        rng = np.random.default_rng([self.cfg.seed, req.stream_index])
        pool = self.by_bucket[req.bucket]
        for _ in range(max(8, 2 * len(req.indices))):
            if not lost_tasks:
                return
            i = int(pool[rng.integers(len(pool))])
            if self.bad_flags[i] or any(i == entry[0] for entry in loaded):
                continue
            text = self._load_into(i, latents[len(loaded)])
            if text is not None:
                loaded.append((i, lost_tasks.pop(0), *text))
        if lost_tasks:
            log.warning(
                f"batch {req.stream_index} ({req.bucket}) comes out with {len(loaded)} of "
                f"{len(req.indices)} samples: no readable replacement found"
                + ("; the step will be skipped" if not loaded else "")
            )

    def _empty(self, req: BatchRequest, skipped: list[str]) -> LatentBatch:
        """A batch of 0 samples: nothing of its bucket was readable (the trainer skips the step)."""
        rec = self.records[req.indices[0]]
        t = rec.shape[0]
        return LatentBatch(
            latents=torch.empty(0, rec.channels, *rec.shape), y=torch.empty(0, 1, 0, 0),
            mask=torch.empty(0, 0, dtype=torch.bool), x_mask=torch.empty(0, t, dtype=torch.bool),
            fps=torch.empty(0), frame_indices=torch.empty(0, t + 2, dtype=torch.long),
            pixel_size=torch.empty(0, 2, dtype=torch.long), tasks=[], bucket=req.bucket, ids=[], skipped=skipped,
            planned=len(req.indices), stream_index=req.stream_index, bad=list(self._found),
        )  # fmt: skip

    def _collate(
        self,
        req: BatchRequest,
        bucket: str,
        latents: torch.Tensor,
        loaded: list,
        skipped: list[str],
        segs: list[Segment],
    ):
        recs = [self.records[i] for i, _, _, _ in loaded]
        b, t = latents.shape[0], latents.shape[2]
        # text up to each sample's last real token, capped at text_len; the batch is as long as its
        # longest caption (the model's cross-attention then sees only the real tokens)
        lengths = [_text_length(mk, self.cfg.text_len) for _, _, _, mk in loaded]
        L = max(lengths)
        specs = [
            ((b, 1, L, loaded[0][2].shape[1]), torch.float32),  # y
            ((b, L), torch.bool),  # mask
            ((b, t), torch.bool),  # x_mask
            ((b,), torch.float32),  # fps
            ((b, t + 2), torch.long),  # frame_indices
            ((b, 2), torch.long),  # pixel_size
        ]
        cap = self.cfg.text_len  # buffers sized for the cap: captions vary, the buffer need not
        reserve = carved_nbytes([((b, 1, cap, specs[0][0][3]), torch.float32), ((b, cap), torch.bool), *specs[2:]])
        y, mask, x_mask, fps, frame_indices, pixel_size = self._alloc(specs, segs, reserve if cap else 0)
        # buffers are reused, so every value is written
        for k, (_, _, yk, mk) in enumerate(loaded):
            n = lengths[k]
            y[k, 0, :n].copy_(yk[:n])  # (converts a stored bf16 caption)
            y[k, 0, n:].zero_()
            mask[k, :n].copy_(mk[:n])
            mask[k, n:] = False
        tasks = [task for _, task, _, _ in loaded]
        x_mask.fill_(True)
        for k, task in enumerate(tasks):
            if task == "i2v":
                x_mask[k, 0] = False  # the reference frame stays clean
        fps.copy_(torch.tensor([r.fps for r in recs], dtype=torch.float32))
        frame_indices.copy_(torch.arange(t + 2, dtype=torch.long).expand(b, t + 2))
        pixel_size.copy_(torch.tensor([[r.height, r.width] for r in recs], dtype=torch.long))
        return LatentBatch(
            latents=latents,
            y=y,
            mask=mask,
            x_mask=x_mask,
            fps=fps,
            frame_indices=frame_indices,
            pixel_size=pixel_size,
            tasks=tasks,
            bucket=bucket,
            ids=[r.id for r in recs],
            skipped=skipped,
            planned=len(req.indices),
            stream_index=req.stream_index,
            bad=list(self._found),
        )


def _text_length(mask: torch.Tensor, cap: int) -> int:
    """Tokens up to and including the last real one (at least 1), capped at `cap` (0: no cap)."""
    real = mask.nonzero()
    n = int(real[-1]) + 1 if len(real) else 1
    return min(n, cap) if cap else n


def _all_finite(t: torch.Tensor) -> bool:
    """Whether every value is finite, in one pass: a sum is non-finite iff a value is (or the sum
    overflows, which latents and text features never do). Single-threaded: on a few busy cores
    torch's parallel reduction waits on its other threads far longer than the pass takes."""
    if torch.get_num_threads() == 1 or t.dtype == torch.bfloat16:  # (numpy has no bfloat16)
        return bool(torch.isfinite(t.sum()))
    return bool(np.isfinite(np.sum(t.numpy())))
