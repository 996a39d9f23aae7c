"""The typed config of `mugv curate` (loaded with mugv.config.load_config).

Filter thresholds default to the MUG-V technical report's where it gives them: Laplacian
variance within [200, 2000], aesthetic score >= 4.5, optical-flow magnitude within [1, 20]
pixels per frame. The report does not state the resolution sharpness and motion are measured
at; mugv measures both at `analysis.reference_short_side` (360 px short side, mugv's choice).
The other thresholds (resolution, fps, brightness, black / frozen frames, borders, artefact
probability, near-duplicate distance) are mugv's, chosen loose.

Only `filters` may change between runs into one output directory (`mugv curate summary`
re-applies them to the stored scores); the other sections decide the scores themselves.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from mugv.data.buckets import BucketTable, BucketTableConfig

MODEL_KINDS = ("aesthetic", "artifact", "caption")
ENGINES = ("local", "ray")


@dataclass
class ShotConfig:
    """Shot splitting: PySceneDetect's ContentDetector, then a colour-structure check."""

    detect_short_side: int = 180  # frames are downscaled to this short side for detection
    threshold: float = 27.0  # ContentDetector threshold (its default)
    min_shot_frames: int = 15  # ContentDetector min_scene_len, source frames
    # a cut is kept only if the HSV colour histograms (hue x saturation, 16 x 16 bins) of the
    # frames either side differ by at least this Bhattacharyya distance; rejects flashes and
    # fast motion the content detector mistakes for cuts. 0 keeps every detected cut.
    min_hist_distance: float = 0.15
    margin_frames: int = 1  # source frames left out at each end of a shot before cutting clips


@dataclass
class ClipConfig:
    """Clips cut from shots: `buckets.num_frames` lengths (8k+1) at `fps`, as `mugv prep` cuts."""

    fps: float = 24.0  # target frame rate (a slower source keeps its own), same as prep's `fps`
    buckets: BucketTableConfig = field(default_factory=BucketTableConfig)
    max_clips_per_shot: int = 0  # 0 = as many consecutive clips as fit


@dataclass
class AnalysisConfig:
    """How the scores are measured (see mugv.curate.scorers)."""

    reference_short_side: int = 360  # sharpness, borders, hashes, model inputs; motion is in these pixels
    flow_short_side: int = 128  # Farneback runs on frames this small; brightness/black/frozen too
    key_frames: int = 3  # evenly spaced frames for sharpness, borders, hashes and models
    motion_pairs: int = 16  # evenly spaced consecutive-frame pairs for optical flow (0 = all)
    black_luma: float = 16.0  # a frame whose mean luma is below this is black
    frozen_diff: float = 0.5  # consecutive frames whose mean |difference| is below this are frozen
    border_luma: float = 20.0  # edge rows / columns darker than this (on every key frame) are borders


@dataclass
class FilterConfig:
    """A clip is kept when it passes all of these; min/max bounds are inclusive."""

    min_short_side: int = 240
    min_fps: float = 15.0
    min_sharpness: float = 200.0  # report
    max_sharpness: float = 2000.0  # report
    min_motion: float = 1.0  # report
    max_motion: float = 20.0  # report
    min_aesthetic: float = 4.5  # report; applied when an aesthetic model is configured
    max_artifact: float = 0.5  # applied when an artefact model is configured
    min_brightness: float = 20.0
    max_brightness: float = 235.0
    max_black_fraction: float = 0.2
    max_frozen_fraction: float = 0.5
    max_border_fraction: float = 0.1
    # near-duplicates: summed Hamming distance of the key frames' 64-bit pHashes at most this
    max_duplicate_distance: int = 10

    def validate(self) -> None:
        for lo, hi in (
            ("min_sharpness", "max_sharpness"),
            ("min_motion", "max_motion"),
            ("min_brightness", "max_brightness"),
        ):
            if getattr(self, lo) > getattr(self, hi):
                raise ValueError(
                    f"filters.{lo} = {getattr(self, lo)} exceeds filters.{hi} = {getattr(self, hi)}"
                )
        for name in ("max_black_fraction", "max_frozen_fraction", "max_border_fraction", "max_artifact"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"filters.{name} = {getattr(self, name)} is not in [0, 1]")
        if self.max_duplicate_distance < -1:
            raise ValueError("filters.max_duplicate_distance must be >= -1 (-1 turns de-duplication off)")


@dataclass
class ModelConfig:
    """A model-based scorer or captioner in a local directory holding `curate_model.json`
    (see mugv.curate.models)."""

    kind: str = ""  # aesthetic | artifact | caption
    path: str = ""


@dataclass
class CurateConfig:
    input: str = ""  # a directory of videos (searched recursively) or a CSV with `path` (+ `caption`)
    output: str = ""  # output directory (created; reruns resume)
    engine: str = "local"  # local (multiprocessing) | ray (Ray Data; the `ray` extra)
    workers: int = 0  # local engine processes; 0 = one per CPU core
    ray_address: str = ""  # "" = a local Ray instance, "auto" = the running cluster
    shard: int = 0  # this process curates the videos i with i % num_shards == shard
    num_shards: int = 1
    log_every_s: float = 30.0
    shots: ShotConfig = field(default_factory=ShotConfig)
    clips: ClipConfig = field(default_factory=ClipConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    filters: FilterConfig = field(default_factory=FilterConfig)
    models: list[ModelConfig] = field(default_factory=list)

    def validate(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"engine = {self.engine!r}, expected one of {ENGINES}")
        if self.workers < 0:
            raise ValueError(f"workers = {self.workers} is negative")
        if not 0 <= self.shard < self.num_shards:
            raise ValueError(f"shard = {self.shard} is not in [0, num_shards = {self.num_shards})")
        BucketTable.from_config(self.clips.buckets)
        if self.clips.fps <= 0:
            raise ValueError(f"clips.fps = {self.clips.fps} must be positive")
        if not any(f > 1 for f in self.clips.buckets.num_frames):
            raise ValueError(
                f"clips.buckets.num_frames = {self.clips.buckets.num_frames} has no video length"
            )
        a = self.analysis
        for name in ("reference_short_side", "flow_short_side", "key_frames"):
            if getattr(a, name) < 1:
                raise ValueError(f"analysis.{name} = {getattr(a, name)} must be >= 1")
        if a.motion_pairs < 0 or self.clips.max_clips_per_shot < 0 or self.shots.margin_frames < 0:
            raise ValueError(
                "analysis.motion_pairs, clips.max_clips_per_shot and shots.margin_frames must be >= 0"
            )
        if self.shots.detect_short_side < 16 or self.shots.min_shot_frames < 1:
            raise ValueError("shots.detect_short_side must be >= 16 and shots.min_shot_frames >= 1")
        self.filters.validate()
        kinds = [m.kind for m in self.models]
        for n, m in enumerate(self.models):
            if m.kind not in MODEL_KINDS:
                raise ValueError(f"models[{n}].kind = {m.kind!r}, expected one of {MODEL_KINDS}")
            if kinds.count(m.kind) > 1:
                raise ValueError(f"models: more than one {m.kind!r} model")
            if not os.path.isfile(os.path.join(m.path, "curate_model.json")):
                raise ValueError(f"models[{n}].path = {m.path!r}: no curate_model.json there")
