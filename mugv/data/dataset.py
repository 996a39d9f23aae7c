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
        self.known_bad: set[int] = set()  # per worker process
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
            self.known_bad.add(i)
            log.warning(f"bad sample {rec.id} ({rec.latent_file}): {type(err).__name__}: {err}")
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
        if self._pool.shared and self.pool_flags is not None:
            return pack(batch, TENSOR_FIELDS, segs, self._pool.worker)
        return batch

    def _packed(self, req: PackedRequest) -> PackedBatch:
        """One part per bucket, each built like a bucket batch (bad samples refilled from their own
        bucket, so the micro-batch keeps its tokens); a part with nothing readable is left out
        (its samples counted as skipped on the first part), and a micro-batch left with no part
        becomes one sample from anywhere. In a worker the parts travel as Parcels, which the
        loader unpacks."""
        parts, lost, lost_planned = [], [], 0
        for part in req.parts:
            batch, segs = self._build(part, fallback=False)
            if batch is None:
                lost += [self.records[i].id for i in part.indices]
                lost_planned += len(part.indices)
            else:
                parts.append((batch, segs))
        if not parts:  # part 0 again, now with the fallback (it counts its own bad samples)
            n0 = len(req.parts[0].indices)
            lost, lost_planned = lost[n0:], lost_planned - n0
            parts = [self._build(req.parts[0])]
        parts[0][0].skipped.extend(lost)
        parts[0][0].planned += lost_planned
        return PackedBatch([self._ship(b, segs) for b, segs in parts], req.stream_index)

    def _build(self, req: BatchRequest, fallback: bool = True) -> tuple[LatentBatch | None, list[Segment]]:
        segs: list[Segment] = []
        latents = self._buffer(len(req.indices), self.records[req.indices[0]], segs)
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
            self._give_back(segs)
            if not fallback:
                return None, []
            latents, loaded = self._fallback(req, segs)
            bucket = self.records[loaded[0][0]].bucket
        return self._collate(req, bucket, latents[: len(loaded)], loaded, skipped, segs), segs

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

    def _fallback(self, req: BatchRequest, segs: list[Segment]) -> tuple[torch.Tensor, list]:
        """A one-sample batch from anywhere in the data, for a batch whose bucket gave nothing."""
        rng = np.random.default_rng([self.cfg.seed, req.stream_index, 1])
        for _ in range(32):
            i = int(rng.integers(len(self.records)))
            if i in self.known_bad:
                continue
            latents = self._buffer(1, self.records[i], segs)
            text = self._load_into(i, latents[0])
            if text is None:
                self._give_back(segs)
            else:
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
