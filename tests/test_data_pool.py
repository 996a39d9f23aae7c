"""Reused batch buffers (mugv.data.shm_pool): reuse happens, and never under a batch still in use."""

import gc
import itertools

import pytest
import torch

from mugv.data import DataConfig, LatentLoader
from mugv.data.batch import TENSOR_FIELDS, LatentBatch
from mugv.data.shm_pool import ALIGN, BUSY, FREE, Receiver, SegmentPool, carve, new_flags, pack
from mugv.data.synthetic import write_synthetic_dataset

SHAPES = {(2, 4, 4): 12, (1, 4, 6): 6}


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("pool") / "ds")
    write_synthetic_dataset(root, SHAPES, text_dim=16, text_len=5, shard_bytes=20000)
    return root


def loader_for(root, workers, pooled=64):
    cfg = DataConfig(
        paths=[root], token_budget=40, max_batch_size=3, num_workers=workers, text_len=7, seed=1,
        pooled_batches=pooled,
    )  # fmt: skip
    return LatentLoader(cfg)


def expect(batch):
    """What the stored samples say each row must hold: (first latent value, text length) per id."""
    return [(float(int(sid[1:])), 1 + int(sid[1:]) % 5) for sid in batch.ids]


def seen(batch):
    return [(float(batch.latents[k].flatten()[0]), int(batch.mask[k].sum())) for k in range(len(batch))]


def test_carve_aligns_and_bounds():
    st = torch.UntypedStorage(4096)
    a, b, c = carve(st, [((3, 5), torch.float32), ((7,), torch.bool), ((2, 2), torch.int64)])
    offsets = [t.data_ptr() - st.data_ptr() for t in (a, b, c)]
    assert offsets == [0, ALIGN, 2 * ALIGN] and c.shape == (2, 2) and c.dtype == torch.int64
    with pytest.raises(ValueError, match="do not fit"):
        carve(st, [((2000,), torch.float32)])


def test_local_pool_reuses_only_garbage():
    pool = SegmentPool(2)
    s1 = pool.take(1000)
    held = carve(pool.hand_out(s1), [((250,), torch.float32)])[0].fill_(1.0)
    s2 = pool.take(1000)
    assert s2.slot != s1.slot
    view = carve(pool.hand_out(s2), [((250,), torch.float32)])[0][10:]  # only a view survives
    s3 = pool.take(1000)  # both slots out: unpooled
    assert s3.slot == -1
    del s3
    gc.collect()
    assert pool.take(500).slot == -1  # the view still pins slot 2
    del view
    s4 = pool.take(500)
    assert s4.slot == s2.slot and s4.gen == s2.gen  # reused, same buffer
    assert torch.equal(held, torch.ones(250))
    pool.release(s4)
    s5 = pool.take(8000)  # too small: regrown, a new generation
    assert s5.slot == s2.slot and s5.gen == s2.gen + 1 and s5.storage.nbytes() >= 8000


def _fake_batch(latents, y):
    b = latents.shape[0]
    return LatentBatch(
        latents=latents, y=y, mask=torch.ones(b, 2, dtype=torch.bool), x_mask=torch.ones(b, 1, dtype=torch.bool),
        fps=torch.ones(b), frame_indices=torch.zeros(b, 3, dtype=torch.long),
        pixel_size=torch.zeros(b, 2, dtype=torch.long), tasks=["t2i"] * b, bucket="1x1x1", ids=["a"] * b,
    )  # fmt: skip


def test_parcel_ships_a_segment_once_and_frees_it_when_dropped():
    flags = new_flags(1, 2)
    pool, recv = SegmentPool(2, flags, 0), Receiver(flags)
    seg = pool.take(4096)
    lat, y = carve(seg.storage, [((2, 8), torch.float32), ((2, 4), torch.float32)])
    lat.copy_(torch.arange(16.0).view(2, 8))
    y.fill_(3.0)
    first = pack(_fake_batch(lat[:1], y[:1]), TENSOR_FIELDS, [seg], 0)
    assert first.segments[0][3] is not None and first.batch.latents is None
    got = recv.unpack(first)
    assert got.latents.tolist() == [list(range(8))] and got.y.tolist() == [[3.0] * 4]
    assert flags[0, seg.slot] == BUSY
    again = pool.take(4096)  # slot still busy: the other slot
    assert again.slot != seg.slot
    pool.release(again)
    keep = got.latents.clone()
    del got
    recv.poll()
    assert flags[0, seg.slot] == FREE
    seg2 = pool.take(4096)
    assert seg2.slot == seg.slot and not seg2.ship  # reused; the receiver already maps it
    lat2, y2 = carve(seg2.storage, [((2, 8), torch.float32), ((2, 4), torch.float32)])
    lat2.fill_(-1.0)
    second = pack(_fake_batch(lat2, y2), TENSOR_FIELDS, [seg2], 0)
    assert second.segments[0][3] is None
    assert recv.unpack(second).latents.eq(-1.0).all() and torch.equal(keep, torch.arange(8.0)[None])
    stale = pack(_fake_batch(lat, y), TENSOR_FIELDS, [seg2], 0)
    stale.segments[0] = (0, seg2.slot, seg2.gen + 5, None)
    with pytest.raises(RuntimeError, match="generation"):
        recv.unpack(stale)


@pytest.mark.parametrize("workers,pooled", [(0, 2), (2, 2), (2, 64), (2, 0)])
def test_held_batches_stay_intact_while_buffers_are_reused(ds, workers, pooled):
    """Small pools run out (fresh buffers then), large ones do not; 0 reuses nothing."""
    loader = loader_for(ds, workers, pooled)
    held, views = [], []
    for n, batch in enumerate(itertools.islice(iter(loader), 40)):
        assert seen(batch) == expect(batch)
        if n % 7 == 0:
            held.append(batch)  # kept whole
        elif n % 7 == 3:
            views.append((batch.latents[-1], batch.latents[-1].clone(), batch.mask[:1]))  # only views kept
    for batch in held:
        assert seen(batch) == expect(batch)
        assert all(batch.y[k, 0, n:].abs().sum() == 0 for k, (_, n) in enumerate(expect(batch)))
    for view, copy, _ in views:
        assert torch.equal(view, copy)
    more = list(itertools.islice(iter(loader), 3))  # a new iteration does not touch old batches
    assert all(seen(b) == expect(b) for b in held + more)


@pytest.mark.parametrize("workers", [0, 2])
def test_buffers_are_reused_once_batches_are_dropped(ds, workers):
    loader = loader_for(ds, workers)
    for batch in itertools.islice(iter(loader), 40):
        assert seen(batch) == expect(batch)
    if workers:  # 2 segments a batch; each sent once, then only named
        assert loader.receiver.shipped <= 2 * 10 and loader.receiver.reused >= 80 - 2 * 10
    else:
        pool = loader.dataset._pool
        assert pool.created <= 4 and pool.unpooled == 0  # this batch and the one before


def test_batches_outlive_their_loader(ds):
    loader = loader_for(ds, 2)
    batches = list(itertools.islice(iter(loader), 5))
    del loader
    gc.collect()
    assert all(seen(b) == expect(b) for b in batches)
