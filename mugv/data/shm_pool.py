"""Reused batch buffers, and handing batches from DataLoader workers to the main process cheaply.

Fresh memory is slow at these sizes: each page of a new buffer faults on first touch, and torch
also reserves every page of new shared memory up front; ~30-40 ms for one 19 MB 720p latent on
a 2-core machine, several times the cost of reading it from the page cache. And torch sends
every shared tensor as a file descriptor over a fresh authenticated socket connection
(multiprocessing's resource sharer), ~2-3 ms per tensor on the main process. So:

  * each process keeps a few buffers ("segments"; slots of a SegmentPool) and reuses one once
    nothing refers to the batch that used it;
  * a worker sends a segment's descriptor only the first time; after that a batch travels as a
    `Parcel` naming (worker, slot, generation) and byte ranges, and the main process rebuilds
    the tensors on its own mapping of the segment (`Receiver.unpack`).

Liveness: every handed-out batch's tensors are views of an *alias* of the segment, a tensor
made with torch.frombuffer, which has its own storage (and reference count) on the same
memory; a weak reference to that storage expires exactly when no tensor or view of the batch
is left. In a worker, `flags[w, s]` is BUSY while slot s is out; the worker only sets FREE
slots BUSY and the main process only sets slots it received FREE, so they never race.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch.multiprocessing.reductions import StorageWeakRef

FREE, BUSY = 0, 1
ALIGN = 64  # bytes; start of every tensor carved out of a segment

Specs = list[tuple[tuple[int, ...], torch.dtype]]


def new_flags(workers: int, slots: int) -> torch.Tensor:
    """[workers, slots] uint8 in shared memory, all FREE (made by the main process)."""
    return torch.zeros(workers, slots, dtype=torch.uint8).share_memory_()


def _layout(specs: Specs) -> tuple[list[int], int]:
    """Byte offsets of tensors of the given (shape, dtype) one after another, and the end."""
    offsets, end = [], 0
    for shape, dtype in specs:
        start = -(-end // ALIGN) * ALIGN
        offsets.append(start)
        end = start + math.prod(shape) * dtype.itemsize
    return offsets, end


def carved_nbytes(specs: Specs) -> int:
    return _layout(specs)[1]


def carve(storage: torch.UntypedStorage, specs: Specs) -> list[torch.Tensor]:
    """Contiguous tensors of the given (shape, dtype) laid out one after another in `storage`."""
    offsets, end = _layout(specs)
    if end > storage.nbytes():
        raise ValueError(f"{end} bytes of tensors do not fit a {storage.nbytes()} byte buffer")
    return [
        torch.empty(0, dtype=dtype).set_(storage, start // dtype.itemsize, shape)
        for start, (shape, dtype) in zip(offsets, specs, strict=True)
    ]


def alias(storage: torch.UntypedStorage) -> torch.UntypedStorage:
    """A new storage on the same memory, with a reference count of its own."""
    base = torch.empty(0, dtype=torch.uint8).set_(storage).numpy()
    return torch.frombuffer(base, dtype=torch.uint8).untyped_storage()


@dataclass
class Segment:
    slot: int  # -1: not pooled (no slot was free)
    gen: int  # bumped whenever the slot gets a new buffer
    storage: torch.UntypedStorage
    ship: bool  # the receiver has not seen this buffer yet


class SegmentPool:
    """A process's reusable buffers. In a worker (`flags` given): shared memory, handed back by
    the main process through flags[worker]. In the main process (`flags` None): ordinary
    memory, free again once the alias it was handed out as is garbage."""

    def __init__(self, slots: int, flags: torch.Tensor | None = None, worker: int = 0):
        self.shared = flags is not None
        self.flags = flags[worker] if flags is not None else torch.zeros(slots, dtype=torch.uint8)
        self.worker = worker
        n = len(self.flags)
        self.storages: list[torch.UntypedStorage | None] = [None] * n
        self.gens, self.shipped = [0] * n, [False] * n
        self.out: list[StorageWeakRef | None] = [None] * n  # in the main process: the alias handed out
        self.created = self.unpooled = 0  # buffers made for slots, and made because none was free

    def _new(self, nbytes: int) -> torch.UntypedStorage:
        nbytes = max(nbytes, 1)
        return torch.UntypedStorage._new_shared(nbytes) if self.shared else torch.UntypedStorage(nbytes)

    def take(self, nbytes: int) -> Segment:
        """A free segment of at least nbytes (the smallest that fits; else an empty slot, else a
        free one regrown), now BUSY; if none is free, an unpooled one."""
        for s, ref in enumerate(self.out):
            if ref is not None and ref.expired():
                self.out[s] = None
                self.flags[s] = FREE
        size = [-1 if st is None else st.nbytes() for st in self.storages]
        free = [s for s, flag in enumerate(self.flags.tolist()) if flag == FREE]
        fits = [s for s in free if size[s] >= nbytes]
        if fits:
            slot = min(fits, key=lambda s: size[s])
        elif free:
            slot = min(free, key=lambda s: size[s])
            self.storages[slot] = None  # let go of a too-small buffer before making its successor
            self.storages[slot] = self._new(nbytes)
            self.created += 1
            self.gens[slot] += 1
            self.shipped[slot] = False
        else:
            self.unpooled += 1
            return Segment(-1, 0, self._new(nbytes), True)
        self.flags[slot] = BUSY
        ship, self.shipped[slot] = not self.shipped[slot], True
        return Segment(slot, self.gens[slot], self.storages[slot], ship)

    def hand_out(self, seg: Segment) -> torch.UntypedStorage:
        """Main process: the storage to build a batch on; the slot is free once it is garbage."""
        view = alias(seg.storage)
        if seg.slot >= 0:
            self.out[seg.slot] = StorageWeakRef(view)
        return view

    def release(self, seg: Segment) -> None:
        """Give back a segment that was not handed out after all (its next use re-ships it)."""
        if seg.slot >= 0:
            self.flags[seg.slot] = FREE
            self.out[seg.slot] = None
            self.shipped[seg.slot] = self.shipped[seg.slot] and not seg.ship


@dataclass
class Parcel:
    """A batch on its way from a worker: `batch` with its tensor fields set to None, `views`
    field -> (segment index, byte offset, shape, dtype), `segments` [(worker, slot, gen,
    storage or None once the main process has it)]."""

    batch: object
    views: dict[str, tuple[int, int, tuple[int, ...], torch.dtype]]
    segments: list[tuple[int, int, int, torch.UntypedStorage | None]]


def pack(batch, fields: tuple[str, ...], segments: list[Segment], worker: int) -> Parcel:
    """The parcel of `batch`; tensor `fields` that are contiguous and in one of `segments`
    travel as byte ranges, any other tensor the usual way."""
    ptrs = [seg.storage.data_ptr() for seg in segments]
    views = {}
    for name in fields:
        t = getattr(batch, name)
        ptr = t.untyped_storage().data_ptr()
        if t.is_contiguous() and ptr in ptrs:
            views[name] = (ptrs.index(ptr), t.storage_offset() * t.element_size(), tuple(t.shape), t.dtype)
    return Parcel(
        dataclasses.replace(batch, **dict.fromkeys(views)),
        views,
        [(worker, s.slot, s.gen, s.storage if s.ship else None) for s in segments],
    )


class Receiver:
    """Main process: rebuilds parcels on its own mappings of the workers' segments and hands
    each slot back (flags FREE) once nothing refers to the batch built on it."""

    def __init__(self, flags: torch.Tensor):
        self.flags = flags
        self.mapped: dict[tuple[int, int], tuple[int, torch.UntypedStorage]] = {}
        self.pending: list[tuple[tuple[int, int], StorageWeakRef]] = []
        self.shipped = self.reused = 0  # segments that came with a descriptor / as a reference

    def unpack(self, parcel: Parcel):
        self.poll()
        views = []
        for worker, slot, gen, storage in parcel.segments:
            self.shipped += storage is not None
            self.reused += storage is None
            if storage is not None:
                if slot >= 0:
                    self.mapped[worker, slot] = (gen, storage)
            else:
                have, storage = self.mapped.get((worker, slot), (-1, None))
                if have != gen:
                    raise RuntimeError(f"worker {worker} slot {slot}: generation {gen} never arrived")
            view = alias(storage)
            if slot >= 0:
                self.pending.append(((worker, slot), StorageWeakRef(view)))
            views.append(view)
        tensors = {}
        for name, (k, offset, shape, dtype) in parcel.views.items():
            tensors[name] = torch.empty(0, dtype=dtype).set_(views[k], offset // dtype.itemsize, shape)
        return dataclasses.replace(parcel.batch, **tensors)

    def poll(self) -> None:
        keep = []
        for (worker, slot), ref in self.pending:
            if ref.expired():
                self.flags[worker, slot] = FREE
            else:
                keep.append(((worker, slot), ref))
        self.pending = keep
