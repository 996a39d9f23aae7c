"""Data preparation: media + captions -> a mugv latent dataset (see pipeline.run_prep)."""

from mugv.data.prep.captions import PrepItem, read_captions
from mugv.data.prep.media import Clip, MediaError, read_image, read_video
from mugv.data.prep.pipeline import PrepConfig, PrepSummary, run_prep

__all__ = [
    "Clip",
    "MediaError",
    "PrepConfig",
    "PrepItem",
    "PrepSummary",
    "read_captions",
    "read_image",
    "read_video",
    "run_prep",
]
