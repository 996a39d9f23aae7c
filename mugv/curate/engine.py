"""Engines: run the per-video function over a list of videos, handing each result line on.

  local  spawned processes (a pool keeping 2 videos per worker in flight); workers == 1 runs
         in this process
  ray    Ray Data over a cluster (or a local Ray instance): from_items(videos).map(the same
         function), results streamed back to this driver, which writes them

Either way only the driver writes the results file, one line per video, as each finishes.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

from mugv.curate.config import CurateConfig
from mugv.curate.video import VideoJob, curate_video_line

Emit = Callable[[str], None]


def run_local(jobs: list[VideoJob], cfg: CurateConfig, emit: Emit) -> None:
    workers = min(cfg.workers or os.cpu_count() or 1, len(jobs))
    fn = functools.partial(curate_video_line, cfg=cfg)
    if workers <= 1:
        for job in jobs:
            emit(fn(job))
        return
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        pending, queue = set(), iter(jobs)
        try:
            while True:
                for job in itertools.islice(queue, 2 * workers - len(pending)):
                    pending.add(pool.submit(fn, job))
                if not pending:
                    break
                finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                for f in finished:
                    emit(f.result())
        except BrokenProcessPool:
            raise RuntimeError(
                "a curation worker process died (out of memory?); finished videos are saved, rerun to resume"
            ) from None


def _ray_row(row: dict, cfg: CurateConfig) -> dict:
    return {"line": curate_video_line(VideoJob(**row), cfg)}


def run_ray(jobs: list[VideoJob], cfg: CurateConfig, emit: Emit) -> None:
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address=cfg.ray_address or None, include_dashboard=False, log_to_driver=False)
    try:
        rows = [dataclasses.asdict(j) for j in jobs]
        ds = ray.data.from_items(rows, override_num_blocks=len(rows))
        for row in ds.map(functools.partial(_ray_row, cfg=cfg), num_cpus=1).iter_rows():
            emit(row["line"])
    finally:
        if started:
            ray.shutdown()


ENGINES = {"local": run_local, "ray": run_ray}
