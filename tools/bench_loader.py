"""Benchmark the latent loader against raw disk reads of the same shard files.

    python tools/bench_loader.py [--samples 100] [--workers 2] [--dir NEW_DIR] [--keep]

Writes a synthetic dataset of 720p-shaped latents (24 x 14 x 90 x 160 float32, ~19 MB each,
one per micro-batch under the default token budget), then measures, each from a cold page cache
(the files are evicted with posix_fadvise) and again warm:
  raw    - reading every shard file start to end (MiB/s of file bytes),
  loader - LatentLoader batches as the trainer receives them, in steady state (samples/s, and
           MiB/s of the stored bytes it read: each delivered sample's latent, text and mask as
           they are in the shard, not the padded or converted batch tensors),
and prints loader / raw (the median of --repeats runs; each run's numbers are printed too).

Steady state: the loader first delivers `warm-up` batches (workers * (prefetch_factor + 2), at
least 2), which starts the workers and fills their buffer pools (a one-off cost of a few
fresh buffers, reported as "startup"). For the cold run the files are then evicted, and the
batches the workers had already prefetched are taken untimed, so every timed sample is read
after the eviction; the timed part is the rest of the epoch. The warm run times one full
epoch after the warm-up. The loader is bounded by CPU (copy from the page cache, the finite
check), so it scales with free cores and workers; other processes on the machine show up
directly (the load average is printed).
"""

from __future__ import annotations

import argparse
import glob
import itertools
import os
import shutil
import statistics
import sys
import tempfile
import time

from mugv.data import DataConfig, LatentLoader
from mugv.data.synthetic import write_synthetic_dataset

SHAPE = (14, 90, 160)  # latent T, H, W of a 105-frame 720x1280 clip


def evict(files: list[str]) -> None:
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def raw_read(files: list[str], chunk: int = 16 << 20) -> tuple[float, int]:
    buf = bytearray(chunk)
    total, t0 = 0, time.perf_counter()
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    return time.perf_counter() - t0, total


def stored_bytes(files: list[str]) -> dict[str, int]:
    """Sample id -> bytes of its latent, text and mask in the shard files."""
    from mugv.data.reader import _Shard

    out: dict[str, int] = {}
    for path in files:
        shard = _Shard(path)
        for key, (_, _, start, end) in shard.entries.items():
            sid = key.rsplit(".", 1)[0]
            out[sid] = out.get(sid, 0) + end - start
        shard.close()
    return out


def loader_read(root: str, workers: int, cold_files: list[str] | None, sizes: dict[str, int]) -> tuple[float, float, int, int]:
    """-> (seconds of start-up and warm-up, seconds timed, samples timed, bytes timed); with
    `cold_files`, those are evicted after the warm-up (see the module docstring)."""
    cfg = DataConfig(paths=[root], num_workers=workers, text_len=300, seed=0)
    warmup = max(2, workers * (cfg.prefetch_factor + 2))
    t0 = time.perf_counter()
    loader = LatentLoader(cfg)
    if loader.epoch_batches <= warmup + workers * cfg.prefetch_factor + 2:
        raise SystemExit(f"--samples too small for a warm-up of {warmup} batches; use at least {3 * warmup}")
    it = iter(loader)
    for _ in itertools.islice(it, warmup):
        pass
    timed = loader.epoch_batches
    if cold_files is not None:
        evict(cold_files)
        in_flight = workers * cfg.prefetch_factor
        for _ in itertools.islice(it, in_flight):
            pass
        timed -= warmup + in_flight
    t1 = time.perf_counter()
    n = nbytes = 0
    for batch in itertools.islice(it, timed):
        n += len(batch)
        nbytes += sum(sizes[i] for i in batch.ids)
    return t1 - t0, time.perf_counter() - t1, n, nbytes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=100,
                   help="samples written (~19 MB each); cold runs time all but the first 12, warm runs all but 8")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="runs of each measurement; the median is reported")
    p.add_argument("--dir", default=None, help="a new directory for the dataset (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the dataset afterwards")
    args = p.parse_args(argv)
    if args.dir and os.path.exists(args.dir):
        p.error(f"--dir {args.dir} exists; give a new directory")
    root = args.dir or tempfile.mkdtemp(prefix="mugv-bench-")
    try:
        t0 = time.perf_counter()
        write_synthetic_dataset(
            root, {SHAPE: args.samples}, text_dim=4096, text_len=120, shard_bytes=256 << 20
        )
        files = sorted(glob.glob(os.path.join(root, "shards", "*.safetensors")))
        size = sum(os.path.getsize(f) for f in files)
        sizes = stored_bytes(files)
        print(
            f"wrote {args.samples} samples of {SHAPE} ({size / 2**20:.0f} MiB in {len(files)} shards) "
            f"in {time.perf_counter() - t0:.1f} s to {root}"
        )
        print(f"load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
        for cache in ("cold", "warm"):
            ratios = []
            for _ in range(args.repeats):
                if cache == "cold":
                    evict(files)
                else:
                    raw_read(files)  # all cached, also what the last cold run evicted
                dt, nb = raw_read(files)
                raw = nb / dt / 2**20
                startup, dt, n, lb = loader_read(root, args.workers, files if cache == "cold" else None, sizes)
                mbs = lb / dt / 2**20
                ratios.append(mbs / raw)
                print(
                    f"[{cache}] raw read {raw:6.0f} MiB/s ({raw * args.samples / (size / 2**20):5.1f} samples/s)"
                    f" | loader ({args.workers} workers, startup {startup:.2f} s) {n / dt:5.1f} samples/s "
                    f"{mbs:6.0f} MiB/s | loader/raw {mbs / raw:.2f}"
                )
            print(f"[{cache}] median loader/raw over {args.repeats} runs: {statistics.median(ratios):.2f}")
    finally:
        if not args.keep and not args.dir:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
