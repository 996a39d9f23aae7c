"""Latent datasets: on-disk format, buckets, the resumable DP sampler and the trainer's loader."""

from mugv.data.batch import LatentBatch
from mugv.data.buckets import (
    BucketTable,
    BucketTableConfig,
    batch_size_for,
    bucket_name,
    latent_shape,
    num_tokens,
)
from mugv.data.config import DataConfig, MixConfig
from mugv.data.dataset import BadDataError, LatentDataset
from mugv.data.loader import LatentLoader
from mugv.data.sampler import BatchRequest, BucketBatchSampler
from mugv.data.store import DatasetWriter, PreparedSample, SampleRecord, read_records

__all__ = [
    "BadDataError",
    "BatchRequest",
    "BucketBatchSampler",
    "BucketTable",
    "BucketTableConfig",
    "DataConfig",
    "DatasetWriter",
    "LatentBatch",
    "LatentDataset",
    "LatentLoader",
    "MixConfig",
    "PreparedSample",
    "SampleRecord",
    "batch_size_for",
    "bucket_name",
    "latent_shape",
    "num_tokens",
    "read_records",
]
