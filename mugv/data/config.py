"""Typed configs of the latent data loader (loaded with mugv.config.load_config)."""

from __future__ import annotations

from dataclasses import dataclass, field

TASKS = ("t2i", "t2v", "i2v")


@dataclass
class MixConfig:
    """Sampling ratios.

    task_weights: relative shares of t2i / t2v / i2v samples per epoch. Empty = natural
      proportions of the data with no I2V. Images (T = 1) serve t2i; videos serve t2v and i2v,
      a video sample becoming I2V with probability i2v / (t2v + i2v).
    bucket_weights: per latent bucket ("TxHxW") multiplier on its natural share within its
      task group (default 1.0). A share above the bucket's size repeats samples within the
      epoch; below it, a fresh random subset is drawn each epoch.
    """

    task_weights: dict[str, float] = field(default_factory=dict)
    bucket_weights: dict[str, float] = field(default_factory=dict)

    def validate(self) -> None:
        for k, v in self.task_weights.items():
            if k not in TASKS:
                raise ValueError(f"mix.task_weights: unknown task {k!r} (expected one of {TASKS})")
            if v < 0:
                raise ValueError(f"mix.task_weights.{k} = {v} is negative")
        if self.task_weights and sum(self.task_weights.values()) <= 0:
            raise ValueError("mix.task_weights sum to zero")
        for k, v in self.bucket_weights.items():
            _check_bucket_name(f"mix.bucket_weights.{k}", k)
            if v < 0:
                raise ValueError(f"mix.bucket_weights.{k} = {v} is negative")


@dataclass
class DataConfig:
    """The latent loader. `paths`: mugv dataset directories and/or release training CSVs
    (`sample_id,source,latent_path,text_feat_path`)."""

    paths: list[str] = field(default_factory=list)  # dataset directories / release CSVs (required to train)
    token_budget: int = 50402  # DiT tokens per micro-batch per DP rank (one 720p 5 s clip)
    # pack samples of different buckets into one micro-batch (up to token_budget) and deal each step's
    # micro-batches so that DP ranks get equal model FLOPs (mugv.data.packed_sampler); false: one bucket a micro-batch
    packing: bool = False
    max_batch_size: int = 64  # cap on samples per micro-batch (small latents would fill the budget)
    batch_sizes: dict[str, int] = field(default_factory=dict)  # per-bucket override, "TxHxW" -> B
    mix: MixConfig = field(default_factory=MixConfig)
    seed: int = 1234  # sample order and task assignment
    num_workers: int = 2  # loader worker processes per rank (0 = in the main process)
    prefetch_factor: int = 2  # batches each worker prepares ahead
    pin_memory: bool = False  # page-locked batches for faster host-to-GPU copies
    text_len: int = 300  # cap on text tokens (T5 max length; 0 = none); a batch is as long as its longest caption
    default_fps: float = 24.0  # fps of samples that carry none (release CSV rows)
    release_vae_stats: str = (
        ""  # file with `shift`/`scale` [1,24,1,1,1] (e.g. vae.pt) for release "real" rows
    )
    # check every loaded sample for non-finite values on the host (a bad one is skipped and refilled).
    # Off by default: `mugv prep` writes only finite latents and text, `mugv data check --all`
    # verifies a dataset, and a non-finite batch that still gets through makes a non-finite loss,
    # which the trainer's guard skips (naming the sample ids).
    check_finite: bool = False
    max_bad_fraction: float = 0.01  # stop the run past this fraction of bad samples ...
    bad_grace_samples: int = 200  # ... once at least this many samples were attempted
    open_files: int = 8  # shard files kept open per worker
    # batches per worker (or in the main process) whose buffers are kept and reused once the
    # consumer drops them; should cover the batches the consumer holds at once (e.g. 2 steps of
    # micro-batches) plus prefetch_factor. Memory is only taken as needed. 0: fresh per batch.
    pooled_batches: int = 64

    def validate(self) -> None:
        if self.pooled_batches < 0:
            raise ValueError(f"pooled_batches = {self.pooled_batches} is negative")
        if self.token_budget <= 0 or self.max_batch_size <= 0:
            raise ValueError("token_budget and max_batch_size must be positive")
        if not 0.0 <= self.max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction = {self.max_bad_fraction} is not in [0, 1]")
        for k, v in self.batch_sizes.items():
            _check_bucket_name(f"batch_sizes.{k}", k)
            if v <= 0:
                raise ValueError(f"batch_sizes.{k} = {v} must be positive")
        for name, low in (("num_workers", 0), ("prefetch_factor", 1), ("text_len", 0), ("open_files", 1),
                          ("bad_grace_samples", 0)):  # fmt: skip
            if getattr(self, name) < low:
                raise ValueError(f"data.{name} = {getattr(self, name)} must be >= {low}")
        if self.default_fps <= 0:
            raise ValueError(f"data.default_fps = {self.default_fps} must be > 0")
        self.mix.validate()


def _check_bucket_name(key: str, name: str) -> None:
    parts = name.split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise ValueError(f"{key}: bucket names are latent TxHxW (e.g. 14x90x160), got {name!r}")
