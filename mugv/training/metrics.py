"""Training metrics: accumulate per step, reduce over data parallelism, log every N steps.

    metrics = MetricsLogger(cfg.logging, run_dir, rank, model_cfg, world_size, cfg.train.steps,
                            buckets=dataset_buckets, reduce_fn=dp_sum(dp_group))
    for step in ...:
        for micro-batch: metrics.record_batch(batch, per_sample_loss)        # loss [B] or None
        metrics.record_step(lr=..., grad_norm=..., skipped=..., data_wait_s=...)
        metrics.maybe_log(step + 1)        # on EVERY rank (the reduction is collective)

Logged every `logging.interval` steps (and at the last step), on rank 0: a console line, TensorBoard
scalars under run_dir/tb and, with `logging.wandb_project`, Weights & Biases. Both back-ends are
optional: a missing package is warned about once and skipped.

Reduction: samples, tokens, model FLOPs and per-sample loss sums/counts (overall, per task, per
bucket) are summed by `reduce_fn` (a float tensor -> its sum over the data-parallel replicas;
identity by default). Each sample must reach the sum exactly once: with tensor/context
parallelism reduce over the DP group only; with pipeline parallelism record on the last stage
(where the loss is) and let reduce_fn bring that stage's sums to rank 0. lr, grad norm and skipped
steps are the same on all ranks; data-wait and step times are rank 0's.

Objective metrics: an objective's own per-unit values (e.g. Flow-DPO's reward accuracy and
margin, `value_keys` given up front so every rank reduces the same vector) are recorded with
`record_values({key: tensor [U]})` and logged as their means over all units of the window.

Throughput: model FLOPs are those of the forward and backward pass of each sample at its own
T/H/W and real text length (mask sum, at least 1), by
`mugv.models.flops.mugdit_flops_per_sample(..., training=True)` (activation recompute and text
padding are not counted), so TFLOP/s per device = FLOPs / wall time / world size, and
MFU = that / the device's peak (logging.peak_tflops, else the GPU table; none on CPU).
`flops_factor` scales them for objectives that do more per sample (Flow-DPO's reference forward).
"""

from __future__ import annotations

import importlib.util
import math
import os
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from mugv.data.batch import LatentBatch
from mugv.data.buckets import num_tokens
from mugv.models import MUGDiTConfig
from mugv.models.flops import mfu, mugdit_flops_per_sample, peak_bf16_flops
from mugv.training.config import LoggingConfig
from mugv.utils.logging import get_logger

TASKS = ("t2i", "t2v", "i2v")
_COUNTERS = ("samples", "tokens", "flops")

ReduceFn = Callable[[torch.Tensor], torch.Tensor]


def dp_sum(group: Any = None) -> ReduceFn:
    """A reduce_fn that sums over a torch.distributed group (e.g. the data-parallel group)."""
    import torch.distributed as dist

    def reduce(t: torch.Tensor) -> torch.Tensor:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
        return t

    return reduce


@dataclass
class _LossPart:
    losses: torch.Tensor | None  # [B], detached, on the training device
    tasks: list[str]
    bucket: str


class MetricsLogger:
    def __init__(
        self,
        cfg: LoggingConfig,
        run_dir: str | os.PathLike,
        rank: int,
        model_config: MUGDiTConfig,
        world_size: int,
        total_steps: int,
        *,
        buckets: Sequence[str] = (),
        reduce_fn: ReduceFn | None = None,
        flops_fn: Callable[..., float] | None = None,
        clock: Callable[[], float] = time.monotonic,
        device: torch.device | None = None,
        start_step: int = 0,
        run_config: dict | None = None,
        value_keys: Sequence[str] = (),
        flops_factor: float = 1.0,
    ):
        if cfg.interval < 1:
            raise ValueError(f"logging.interval must be >= 1, got {cfg.interval}")
        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.rank = rank
        self.world_size = world_size
        self.total_steps = total_steps
        self.buckets = list(buckets)
        self._reduce = reduce_fn
        self._clock = clock
        self.device = device or _default_device()
        self._flops = lru_cache(maxsize=4096)(_bind_flops(flops_fn, model_config, flops_factor))
        self.value_keys = list(value_keys)
        self._log = get_logger("metrics")
        self._warned: set[str] = set()
        if reduce_fn is not None and not self.buckets:
            self._warn_once("per-bucket losses are off: a reduce_fn was given without the bucket list")
        self.peak_tflops = self._peak_tflops()
        self.totals = {"samples": 0.0, "tokens": 0.0, "skipped_steps": 0.0}
        self._last_step = start_step
        self._window_start = clock()
        self._reset_window()
        self._tb = self._open_tensorboard(start_step) if rank == 0 and cfg.tensorboard else None
        self._wandb = self._open_wandb(run_config) if rank == 0 and cfg.wandb_project else None

    # ---- recording (every rank) ----

    def record_batch(self, batch: LatentBatch, losses: torch.Tensor | None) -> None:
        """One micro-batch and its per-sample losses [B] (None where the loss is not known, e.g.
        on a non-last pipeline stage). Text lengths come from batch.mask: a host sync if it lives
        on the GPU, so prefer calling this before batch.to(device)."""
        _, _, t, h, w = batch.latents.shape
        text_lens = batch.mask.sum(dim=1).tolist()
        self.record_samples(losses, batch.tasks, batch.bucket, (t, h, w), text_lens)

    def record_samples(
        self,
        losses: torch.Tensor | None,
        tasks: Sequence[str],
        bucket: str,
        thw: tuple[int, int, int],
        text_lens: Sequence[int],
    ) -> None:
        n = len(tasks)
        bad = sorted(set(tasks) - set(TASKS))
        if bad:
            raise ValueError(f"MetricsLogger: unknown tasks {bad}; known: {list(TASKS)}")
        if len(text_lens) != n or (losses is not None and losses.numel() != n):
            raise ValueError(
                f"MetricsLogger: {n} tasks, {len(text_lens)} text lengths and "
                f"{None if losses is None else losses.numel()} losses do not match"
            )
        t, h, w = thw
        self._window["samples"] += n
        self._window["tokens"] += n * num_tokens(t, h, w)
        self._window["flops"] += sum(self._flops(t, h, w, int(length)) for length in text_lens)
        loss = None if losses is None else losses.detach().reshape(-1)
        self._parts.append(_LossPart(loss, list(tasks), bucket))

    def record_values(self, values: dict[str, torch.Tensor]) -> None:
        """An objective's per-unit values of one micro-batch, {key: [U]} (keys among value_keys)."""
        unknown = sorted(set(values) - set(self.value_keys))
        if unknown:
            raise ValueError(f"MetricsLogger: unknown value keys {unknown}; known: {self.value_keys}")
        for key, v in values.items():
            self._values_parts.setdefault(key, []).append(v.detach().reshape(-1))

    def record_step(
        self, lr: float, grad_norm: float | None, skipped: bool = False, data_wait_s: float = 0.0
    ) -> None:
        self._steps += 1
        self._lr = float(lr)
        self._skipped += int(skipped)
        self._data_wait += float(data_wait_s)
        if grad_norm is not None and not skipped and math.isfinite(float(grad_norm)):
            self._grad_norm_sum += float(grad_norm)
            self._grad_norm_n += 1

    # ---- logging ----

    def due(self, step: int) -> bool:
        """Whether maybe_log(step) logs: `step` (updates done) is a multiple of the interval or the last."""
        return step % self.cfg.interval == 0 or step == self.total_steps

    def maybe_log(self, step: int, extra: dict[str, float] | None = None) -> dict[str, float] | None:
        """Log if due(step). Call on every rank: the reduction is collective. `extra`: more values
        for rank 0 to log (data faults, straggler times). Returns the logged values on rank 0."""
        if not self.due(step):
            return None
        return self.log(step, extra)

    def log(self, step: int, extra: dict[str, float] | None = None) -> dict[str, float] | None:
        keys = self._loss_keys()
        counters = torch.tensor([self._window[k] for k in _COUNTERS], dtype=torch.float64)
        vec = torch.cat([counters.to(self.device), self._loss_vector(keys), self._values_vector()])  # [3 + 2K + 2V]
        if self._reduce is not None:
            vec = self._reduce(vec)
        vec = vec.cpu().tolist()
        now = self._clock()
        elapsed = max(now - self._window_start, 1e-9)
        steps = max(step - self._last_step, 1)
        n = 3 + 2 * len(keys)
        values = self._values(dict(zip(_COUNTERS, vec[:3], strict=True)), keys, vec[3:n], elapsed, steps, step)
        v = len(self.value_keys)
        for i, key in enumerate(self.value_keys):
            if vec[n + v + i] > 0:  # count
                values[key] = vec[n + i] / vec[n + v + i]
        self._last_step = step
        self._window_start = now
        self._reset_window()
        if self.rank != 0:
            return None
        values.update(extra or {})
        self._log.info(self._line(step, values))
        self._write_scalars(step, values)
        return values

    def _values(
        self, c: dict, keys: list[str], loss: list[float], elapsed: float, steps: int, step: int
    ) -> dict:
        k = len(keys)
        for i, key in enumerate(keys):
            if loss[k + i] > 0:  # count
                c[f"loss/{key}"] = loss[i] / loss[k + i]
        self.totals["samples"] += c["samples"]
        self.totals["tokens"] += c["tokens"]
        self.totals["skipped_steps"] += self._skipped
        tflops = c["flops"] / elapsed / self.world_size / 1e12
        out = {
            **{key: v for key, v in c.items() if key.startswith("loss/")},
            "optim/lr": self._lr,
            "optim/skipped_steps": float(self._skipped),
            "perf/samples_per_s": c["samples"] / elapsed,
            "perf/tokens_per_s": c["tokens"] / elapsed,
            "perf/tflops_per_device": tflops,
            "perf/model_tflop_per_step": c["flops"] / steps / 1e12,  # all devices; recompute not counted
            "perf/step_s": elapsed / steps,
            "perf/data_wait_s_per_step": self._data_wait / steps,
            "perf/max_memory_gib": self._max_memory_gib(),
            "progress/samples": self.totals["samples"],
            "progress/tokens": self.totals["tokens"],
            "progress/eta_s": elapsed / steps * max(self.total_steps - step, 0),
        }
        if self._grad_norm_n:
            out["optim/grad_norm"] = self._grad_norm_sum / self._grad_norm_n
        if self.peak_tflops:
            out["perf/mfu"] = mfu(tflops, self.peak_tflops)
        return out

    def _line(self, step: int, v: dict) -> str:
        tasks = " ".join(f"{t} {v[f'loss/{t}']:.4f}" for t in TASKS if f"loss/{t}" in v)
        loss = (
            f"loss {v['loss/all']:.4f}" + (f" ({tasks})" if tasks else "") if "loss/all" in v else "loss n/a"
        )
        gnorm = f"{v['optim/grad_norm']:.3f}" if "optim/grad_norm" in v else "n/a"
        mfu = f"{v['perf/mfu']:.1%}" if "perf/mfu" in v else "n/a"
        parts = [
            f"step {step}/{self.total_steps}",
            loss,
            f"lr {v['optim/lr']:.3e}",
            f"grad norm {gnorm}",
            f"{v['perf/samples_per_s']:.2f} samples/s",
            f"{v['perf/tokens_per_s']:.0f} tokens/s",
            f"{v['perf/tflops_per_device']:.2f} TFLOP/s/device",
            f"MFU {mfu}",
            f"max mem {v['perf/max_memory_gib']:.2f} GiB",
            f"data wait {v['perf/data_wait_s_per_step']:.3f} s/step",
            f"step {v['perf/step_s']:.3f} s",
        ]
        parts += [f"{key.split('/')[-1].replace('_', ' ')} {v[key]:.4f}" for key in self.value_keys if key in v]
        if v["optim/skipped_steps"]:
            parts.append(f"skipped {int(v['optim/skipped_steps'])}")
        if v.get("data/bad_samples") or v.get("data/skipped_steps"):
            parts.append(f"bad samples {int(v['data/bad_samples'])}, steps without data {int(v['data/skipped_steps'])}")
        if "straggler/slowest_rank" in v:
            parts.append(f"slowest rank {int(v['straggler/slowest_rank'])} ({v['straggler/compute_s_max']:.3f} s "
                         f"compute, median {v['straggler/compute_s_median']:.3f} s)")  # fmt: skip
        parts.append(f"ETA {_duration(v['progress/eta_s'])}")
        return " | ".join(parts)

    def _write_scalars(self, step: int, values: dict) -> None:
        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(key, value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(values, step=step)

    def log_video(self, step: int, name: str, video: torch.Tensor, fps: int = 8) -> None:
        """A preview clip, uint8 [T, H, W, 3] (rank 0 only; no collective). Without moviepy the
        frames go out as one image grid instead of a video."""
        if video.dtype != torch.uint8 or video.dim() != 4 or video.shape[-1] != 3:
            raise ValueError(
                f"log_video({name!r}): expected uint8 [T, H, W, 3], got {video.dtype} {list(video.shape)}"
            )
        if self.rank != 0:
            return
        video = video.detach().cpu()
        as_video = importlib.util.find_spec("moviepy") is not None
        if not as_video:
            self._warn_once("moviepy is not installed: previews are logged as frame grids, not videos")
        if self._tb is not None:
            if as_video:
                self._tb.add_video(
                    name, video.permute(0, 3, 1, 2).unsqueeze(0), step, fps=fps
                )  # [1, T, 3, H, W]
            else:
                self._tb.add_image(name, frame_grid(video), step, dataformats="HWC")
            self._tb.flush()
        if self._wandb is not None:
            if as_video:
                media = self._wandb.Video(video.permute(0, 3, 1, 2).numpy(), fps=fps)  # [T, 3, H, W]
            else:
                media = self._wandb.Image(frame_grid(video).numpy())
            self._wandb.log({name: media}, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def state_dict(self) -> dict:
        return dict(self.totals)

    def load_state_dict(self, state: dict) -> None:
        self.totals = {k: float(state[k]) for k in self.totals}

    # ---- helpers ----

    def _reset_window(self) -> None:
        self._window = {k: 0.0 for k in _COUNTERS}
        self._parts: list[_LossPart] = []
        self._values_parts: dict[str, list[torch.Tensor]] = {}
        self._lr = float("nan")
        self._steps = self._skipped = self._grad_norm_n = 0
        self._data_wait = self._grad_norm_sum = 0.0

    def reset_timer(self) -> None:
        """Start the throughput clock now (call right before the first step)."""
        self._window_start = self._clock()

    def _loss_keys(self) -> list[str]:
        buckets = self.buckets
        if not buckets and self._reduce is None:
            buckets = sorted({p.bucket for p in self._parts})
        return ["all", *TASKS, *(f"bucket/{b}" for b in buckets)]

    def _loss_vector(self, keys: list[str]) -> torch.Tensor:
        """[2K] float64: finite per-sample loss sums per key, then their counts."""
        k = len(keys)
        parts = [p for p in self._parts if p.losses is not None]
        out = torch.zeros(2 * k, dtype=torch.float64, device=self.device)
        if not parts:
            return out
        index = {key: i for i, key in enumerate(keys)}
        losses = torch.cat([p.losses for p in parts]).to(self.device, torch.float64)  # [N]
        task_idx = [index[t] for p in parts for t in p.tasks]
        bucket_idx = [index.get(f"bucket/{p.bucket}", -1) for p in parts for _ in p.tasks]
        finite = torch.isfinite(losses)
        values = torch.where(finite, losses, torch.zeros_like(losses))
        ones = finite.to(torch.float64)
        for idx in ([0] * len(task_idx), task_idx, bucket_idx):
            i = torch.tensor(idx, device=self.device)
            keep = i >= 0
            out[:k].index_add_(0, i[keep], values[keep])
            out[k:].index_add_(0, i[keep], ones[keep])
        return out

    def _values_vector(self) -> torch.Tensor:
        """[2V] float64: finite value sums per value key, then their counts."""
        v = len(self.value_keys)
        out = torch.zeros(2 * v, dtype=torch.float64, device=self.device)
        for i, key in enumerate(self.value_keys):
            if self._values_parts.get(key):
                x = torch.cat(self._values_parts[key]).to(self.device, torch.float64)
                finite = torch.isfinite(x)
                out[i] = x[finite].sum()
                out[v + i] = finite.sum()
        return out

    def _max_memory_gib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30  # Linux: KiB

    def _peak_tflops(self) -> float | None:
        if self.cfg.peak_tflops > 0:
            return float(self.cfg.peak_tflops)
        if self.device.type != "cuda":
            return None
        name = torch.cuda.get_device_name(self.device)
        peak = peak_bf16_flops(name)
        if peak is None:
            self._warn_once(f"no peak TFLOP/s known for {name!r}: set logging.peak_tflops for MFU")
            return None
        return peak / 1e12

    def _open_tensorboard(self, start_step: int):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            self._warn_once(f"TensorBoard logging is off ({e})")
            return None
        return SummaryWriter(str(self.run_dir / "tb"), purge_step=start_step + 1 if start_step else None)

    def _open_wandb(self, run_config: dict | None):
        try:
            import wandb
        except ImportError as e:
            self._warn_once(f"wandb logging is off ({e})")
            return None
        id_file = self.run_dir / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.exists() else None
        try:
            run = wandb.init(
                project=self.cfg.wandb_project, name=self.cfg.wandb_run or None, dir=str(self.run_dir),
                id=run_id, resume="allow", config=run_config,
            )  # fmt: skip
        except Exception as e:  # no network / not logged in: train on without wandb
            self._warn_once(f"wandb logging is off: wandb.init failed ({e})")
            return None
        if run_id is None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            id_file.write_text(run.id)
        return _WandbHandle(wandb, run)

    def _warn_once(self, message: str) -> None:
        if message not in self._warned:
            self._warned.add(message)
            self._log.warning(message)


class _WandbHandle:
    """The wandb module and its run: log/finish go to the run, media types come from the module."""

    def __init__(self, module: Any, run: Any):
        self.Video, self.Image = module.Video, module.Image
        self._run = run

    def log(self, values: dict, step: int) -> None:
        self._run.log(values, step=step)

    def finish(self) -> None:
        self._run.finish()


def frame_grid(video: torch.Tensor) -> torch.Tensor:
    """uint8 [T, H, W, 3] -> [rows * H, cols * W, 3], frames row-major, cols = ceil(sqrt(T))."""
    t, h, w, c = video.shape
    cols = math.ceil(math.sqrt(t))
    rows = math.ceil(t / cols)
    padded = torch.zeros(rows * cols, h, w, c, dtype=video.dtype)
    padded[:t] = video
    # [rows, cols, H, W, 3] -> [rows, H, cols, W, 3] -> [rows*H, cols*W, 3]
    return padded.view(rows, cols, h, w, c).permute(0, 2, 1, 3, 4).reshape(rows * h, cols * w, c)


def _bind_flops(
    flops_fn: Callable[..., float] | None, config: MUGDiTConfig, factor: float = 1.0
) -> Callable[[int, int, int, int], float]:
    if flops_fn is None:
        flops_fn = mugdit_flops_per_sample

    def per_sample(t: int, h: int, w: int, text_len: int) -> float:
        # an all-masked caption still costs one key token's worth of cross-attention work
        return factor * float(flops_fn(config, t, h, w, max(text_len, 1), training=True))

    return per_sample


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s"
