"""Data curation (`mugv curate`): source videos -> shots -> scored clips -> a clips CSV for prep.

Needs the `curate` extra (PySceneDetect, OpenCV, imagehash, pyarrow, matplotlib); `--engine ray`
also the `ray` extra. See pipeline.run_curation for the output layout.
"""

from mugv.curate.config import CurateConfig, FilterConfig, ModelConfig
from mugv.curate.pipeline import list_videos, read_parts, run_curation, summarize
from mugv.curate.sample import stratified_sample
from mugv.curate.video import VideoJob, curate_video

__all__ = [
    "CurateConfig",
    "FilterConfig",
    "ModelConfig",
    "VideoJob",
    "curate_video",
    "list_videos",
    "read_parts",
    "run_curation",
    "stratified_sample",
    "summarize",
]
