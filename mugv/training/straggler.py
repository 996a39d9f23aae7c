"""Per-rank step times: where each rank spends a step, gathered at log steps (straggler report).

Every rank records, per step, its data seconds (fetching the micro-batches) and compute seconds
(from having the data to entering the gradient reduction: its own forward and backward, pipeline
waits included). A slow rank shows up here as the one with the largest compute or data time,
while every rank's wall time per step is the same (they wait for it in the reduction). At a log
step one all-reduce of a [2 x world] vector brings every rank's means to all ranks; rank 0 logs
min / median / max and the slowest rank, and appends the per-rank values to
<run_dir>/step_times.jsonl.
"""

from __future__ import annotations

import json
import os
import statistics

import torch
import torch.distributed as dist


class StepTimes:
    def __init__(self, rank: int, world: int, run_dir: str, device: torch.device):
        self.rank, self.world, self.device = rank, world, device
        self.path = os.path.join(run_dir, "step_times.jsonl")
        self._data: list[float] = []
        self._compute: list[float] = []

    def record(self, data_s: float, compute_s: float) -> None:
        self._data.append(data_s)
        self._compute.append(compute_s)

    def values(self, step: int) -> dict[str, float]:
        """The window's per-rank means, reduced over all ranks (collective); metrics for rank 0."""
        vec = torch.zeros(2 * self.world, dtype=torch.float64, device=self.device)
        if self._compute:
            vec[self.rank] = sum(self._data) / len(self._data)
            vec[self.world + self.rank] = sum(self._compute) / len(self._compute)
        self._data.clear()
        self._compute.clear()
        if dist.is_initialized() and self.world > 1:
            dist.all_reduce(vec)
        data, compute = vec[: self.world].tolist(), vec[self.world :].tolist()
        if self.rank != 0:
            return {}
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "data_s": [round(v, 5) for v in data],
                                "compute_s": [round(v, 5) for v in compute]}) + "\n")  # fmt: skip
        slowest = max(range(self.world), key=compute.__getitem__)
        out = {
            "straggler/compute_s_min": min(compute),
            "straggler/compute_s_median": statistics.median(compute),
            "straggler/compute_s_max": compute[slowest],
            "straggler/data_s_max": max(data),
        }
        if self.world > 1:
            out["straggler/slowest_rank"] = float(slowest)
        return out
