"""Data faults in the loop: steps without data, and the run's quarantine of bad samples.

    faults = DataFaults(loader, cfg, rank, world)   # quarantined samples are never drawn
    if faults.skip_empty(batches, step): continue    # collective: a micro-batch came out empty
    extra = faults.share()                          # at log steps (collective): metrics

A micro-batch with no readable sample (mugv.data.dataset) never reaches the model: every rank
skips the step (so the ranks stay in step) and draws the next batches; the skips are counted
(`data/skipped_steps`, kept in checkpoints); MAX_EMPTY_IN_ROW in a row stop the run. At log
steps the bad samples every rank found since the last one are gathered: every rank flags them
(no loader draws them again), rank 0 appends them to <run_dir>/quarantine.jsonl -- read back at
start, so a resumed run never draws them either -- and `data/bad_samples` counts each sample
once, over all ranks.
"""

from __future__ import annotations

import json
import os

import torch.distributed as dist

from mugv.data.dataset import BadDataError
from mugv.training.guards import agree
from mugv.utils.logging import get_logger

log = get_logger("data")
QUARANTINE = "quarantine.jsonl"
MAX_EMPTY_IN_ROW = 50


def read_quarantine(run_dir: str) -> list[tuple[str, str]]:
    """The run's quarantined samples: (id, reason) from <run_dir>/quarantine.jsonl."""
    path = os.path.join(run_dir, QUARANTINE)
    if not os.path.isfile(path):
        return []
    out = []
    with open(path) as f:
        for line in f:
            try:
                entry = json.loads(line)
                out.append((entry["id"], entry["reason"]))
            except (ValueError, KeyError):  # a line cut short by a kill
                continue
    return out


class DataFaults:
    def __init__(self, loader, cfg, rank: int, world: int):
        self.loader, self.cfg, self.rank, self.world = loader, cfg, rank, world
        self.path = os.path.join(cfg.run_dir, QUARANTINE)
        loader.quarantine(read_quarantine(cfg.run_dir))
        self.listed = set(loader.bad_ids)
        self.skipped_steps = 0
        self._in_row = 0

    def skip_empty(self, batches, step: int) -> bool:
        """True on every rank when a micro-batch of this step is empty on any rank (collective)."""
        if not agree(any(len(b) == 0 for b in batches)):
            self._in_row = 0
            return False
        self.skipped_steps += 1
        self._in_row += 1
        empty = [f"{b.stream_index} ({b.bucket})" for b in batches if len(b) == 0]
        here = f" (here: micro-batch {', '.join(empty)})" if empty else ""
        log.warning(f"step {step + 1}: a micro-batch has no readable sample{here}; the step is skipped "
                    f"({self.skipped_steps} so far)")  # fmt: skip
        if self._in_row >= MAX_EMPTY_IN_ROW:
            raise BadDataError(f"{self._in_row} steps in a row without readable data; run `mugv data check` on "
                               f"{self.cfg.data.paths}")  # fmt: skip
        return True

    def share(self) -> dict[str, float]:
        """Gather the bad samples found since the last call (collective); quarantine them."""
        found = self.loader.take_new_bad()
        if dist.is_initialized() and self.world > 1:
            gathered: list = [None] * self.world
            dist.all_gather_object(gathered, found)
            found = [item for part in gathered for item in part]
        self.loader.quarantine(found)
        fresh = {sid: why for sid, why in found if sid not in self.listed}
        if fresh and self.rank == 0:
            with open(self.path, "a") as f:
                f.writelines(json.dumps({"id": sid, "reason": why}) + "\n" for sid, why in fresh.items())
            sid = next(iter(fresh))
            log.warning(f"{len(fresh)} bad sample(s) quarantined in {self.path} (never drawn again), e.g. {sid}: "
                        f"{fresh[sid]}")  # fmt: skip
        self.listed.update(fresh)
        return {"data/bad_samples": self.loader.metrics()["data/bad_samples"],
                "data/skipped_steps": float(self.skipped_steps)}  # fmt: skip
