"""`run_prep`: captions file + media -> mugv latent dataset (or a pairs file -> a preference-pairs dataset).

Each item (a video or image of the captions file) is decoded, cut into clips of 8k+1 frames at
the target fps (the longest length of the bucket table that fits, up to max_clips_per_video),
resized and centre-cropped to the bucket-table size nearest its aspect ratio, encoded with the
VAE, and written with its caption's text features. The encoders are injected:

    vae.encode(pixels [1, 3, F, H, W] in [-1, 1]) -> latents [1, 24, T, H/8, W/8]
    text_encoder.encode(list[str]) -> (y [B, 1, L, Ct], mask [B, L] bool)

With `pairs` (a file of caption, chosen, rejected rows; prep.pairs) each item is a pair: both
clips go through the same decode / crop / VAE / text path into one bucket and are written as one
item, with `pair` and `role` in their manifest rows (mugv.data.pairs).

Processes split the items by RANK / WORLD_SIZE (item i goes to rank i % WORLD_SIZE), each
writing its own shards. Items already in the dataset (written or failed) are skipped, so a
rerun resumes; `retry_failed` retries the failed ones.
"""

from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from mugv.data.buckets import BucketTable, BucketTableConfig
from mugv.data.prep.captions import PrepItem, read_captions
from mugv.data.prep.media import Clip, MediaError, is_image, read_image, read_video, to_unit_range
from mugv.data.prep.pairs import PairItem, read_pair, read_pairs
from mugv.data.store import DatasetWriter, PreparedSample, read_failures
from mugv.utils.logging import get_logger, progress

log = get_logger("prep")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class PrepConfig:
    captions: str = ""  # .csv / .jsonl with columns path_column, caption_column (+ optional start, end)
    pairs: str = ""  # instead of captions: .csv / .jsonl of preference pairs, columns caption, chosen, rejected
    output: str = ""  # dataset directory (created; appended to on reruns)
    media_root: str = ""  # relative media paths resolve here (default: the captions file's directory)
    path_column: str = "path"
    caption_column: str = "caption"
    buckets: BucketTableConfig = field(default_factory=BucketTableConfig)
    fps: float = 24.0  # target clip frame rate (a slower source keeps its own); also the fps of images
    max_clips_per_video: int = 1
    negative_prompt: str = ""  # stored as the dataset's "negative" text embedding
    source: str = ""  # tag stored in every row (default: the captions file name)
    text_batch: int = 16  # captions encoded per text-encoder call
    latent_dtype: str = "float32"
    text_dtype: str = "bfloat16"
    shard_mb: int = 1024
    retry_failed: bool = False
    log_every_s: float = 30.0
    # used by the `mugv prep` command to build the encoders
    vae: str = ""  # autoencoder: release vae.pt or a JSON spec (mugv.sampling.load_autoencoder)
    t5: str = ""  # local T5 directory
    device: str = ""  # "" = cuda:LOCAL_RANK if available, else cpu
    encoder_dtype: str = "bfloat16"  # on CUDA; CPU always runs the encoders in float32

    def validate(self) -> None:
        if bool(self.captions) == bool(self.pairs) or not self.output:
            raise ValueError("prep needs `output` and one of `captions` (clips) or `pairs` (preference pairs)")
        for name in ("latent_dtype", "text_dtype", "encoder_dtype"):
            if getattr(self, name) not in _DTYPES:
                raise ValueError(f"{name} = {getattr(self, name)!r}, expected one of {sorted(_DTYPES)}")
        if self.max_clips_per_video < 1 or self.text_batch < 1 or self.shard_mb < 1:
            raise ValueError("max_clips_per_video, text_batch and shard_mb must be >= 1")
        BucketTable.from_config(self.buckets)


@dataclass
class PrepSummary:
    items: int = 0  # items of this rank
    already_done: int = 0
    written: int = 0
    clips: int = 0
    failures: Counter = field(default_factory=Counter)  # reason -> count (this run)

    def format(self) -> str:
        fails = ", ".join(f"{r} {n}" for r, n in sorted(self.failures.items())) or "none"
        return (
            f"prep: {self.items} items for this rank, {self.already_done} already done, {self.written} written "
            f"({self.clips} clips), {sum(self.failures.values())} failed ({fails})"
        )


def _trim_text(y: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """y [1, L, Ct], mask [L] -> (y [n, Ct], mask [n]) cut after the last real token."""
    valid = mask.nonzero()
    n = int(valid.max()) + 1 if len(valid) else 1
    return y[0, :n], mask[:n]


def _encode_texts(text_encoder, captions: list[str], dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    with torch.no_grad():
        y, mask = text_encoder.encode(captions)
    if y.dim() != 4 or mask.shape != (len(captions), y.shape[2]):
        raise ValueError(
            f"text encoder returned y {tuple(y.shape)} / mask {tuple(mask.shape)}, "
            f"expected [{len(captions)}, 1, L, C] / [{len(captions)}, L]"
        )
    return [_trim_text(y[b].to("cpu", dtype), mask[b].to("cpu").bool()) for b in range(len(captions))]


def run_prep(
    cfg: PrepConfig,
    vae,
    text_encoder,
    rank: int | None = None,
    world_size: int | None = None,
    device: torch.device | str = "cpu",
) -> PrepSummary:
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world_size = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    table = BucketTable.from_config(cfg.buckets)
    if cfg.pairs:
        items = read_pairs(cfg.pairs, cfg.media_root)
    else:
        items = read_captions(cfg.captions, cfg.path_column, cfg.caption_column, cfg.media_root)
    source = cfg.source or os.path.splitext(os.path.basename(cfg.pairs or cfg.captions))[0]
    writer = DatasetWriter(cfg.output, rank, cfg.shard_mb << 20, _DTYPES[cfg.latent_dtype])
    text_dtype = _DTYPES[cfg.text_dtype]
    if rank == 0:
        (null_y, null_m), (neg_y, neg_m) = _encode_texts(text_encoder, ["", cfg.negative_prompt], text_dtype)
        writer.write_text_embeddings({"null": (null_y, null_m), "negative": (neg_y, neg_m)})
        writer.write_meta(
            getattr(getattr(vae, "config", None), "latent_channels", 24),
            null_y.shape[-1],
            {"null": "", "negative": cfg.negative_prompt},
            pairs=bool(cfg.pairs),
        )
    done = set(writer.done)
    if cfg.retry_failed:
        done -= {f["item"] for f in read_failures(cfg.output)}
    mine = [it for i, it in enumerate(items) if i % world_size == rank]
    todo = [it for it in mine if it.key not in done]
    summary = PrepSummary(items=len(mine), already_done=len(mine) - len(todo))
    log.info(f"prep rank {rank}/{world_size}: {len(todo)} of {len(mine)} items to do -> {cfg.output}")
    start = last_log = time.monotonic()
    chunks = range(0, len(todo), cfg.text_batch)
    for c in progress(chunks, total=len(chunks), desc=f"prep ({cfg.text_batch} items per step)"):
        chunk = todo[c : c + cfg.text_batch]
        texts = _encode_texts(text_encoder, [it.caption for it in chunk], text_dtype)
        for item, (y, mask) in zip(chunk, texts, strict=True):
            prep = _prep_pair if cfg.pairs else _prep_item
            prep(cfg, item, y, mask, table, vae, writer, source, device, summary)
            now = time.monotonic()
            if now - last_log >= cfg.log_every_s:
                n = summary.written + sum(summary.failures.values())
                eta = (now - start) / n * (len(todo) - n)
                log.info(
                    f"prep rank {rank}: {n}/{len(todo)} items, {summary.clips} clips, "
                    f"{summary.clips / (now - start):.2f} clips/s, eta {eta / 60:.1f} min"
                )
                last_log = now
    writer.close()
    log.info(summary.format())
    return summary


def _encode(vae, clip: Clip, device) -> torch.Tensor:
    """The latent [24, T, h, w] of a clip (MediaError if the VAE misbehaves)."""
    with torch.no_grad():
        latent = vae.encode(to_unit_range(clip.pixels).to(device))[0].float().cpu()  # [24, T, h, w]
    f, _, h, w = clip.pixels.shape
    if latent.dim() != 4 or latent.shape[1:] != ((f - 1) // 8 + 1, h // 8, w // 8):
        raise MediaError("encode_error", f"VAE returned {tuple(latent.shape)} for a {f}x{h}x{w} clip")
    if not torch.isfinite(latent).all():
        raise MediaError("encode_error", "VAE returned non-finite latents")
    return latent


def _sample(sid: str, clip: Clip, latent, y, mask, source: str, caption: str, **extra) -> PreparedSample:
    f, _, h, w = clip.pixels.shape
    return PreparedSample(
        id=sid, latent=latent, y=y, mask=mask, fps=clip.fps, num_frames=f, height=h, width=w,
        task="t2v" if f > 1 else "t2i", source=source, caption=caption,
        extra={"start_frame": clip.start_frame, **extra},
    )


def _prep_item(cfg, item: PrepItem, y, mask, table, vae, writer, source, device, summary) -> None:
    def samples():
        if is_image(item.path):
            clips = read_image(item.path, table, cfg.fps)
        else:
            clips = read_video(item.path, table, cfg.fps, cfg.max_clips_per_video, item.frames)
        return [
            _sample(f"{item.key}#{k}" if clip.pixels.shape[0] > 1 else item.key, clip, _encode(vae, clip, device),
                    y, mask, source, item.caption)
            for k, clip in enumerate(clips)
        ]

    _write(writer, item, y, samples, summary)


def _prep_pair(cfg, item: PairItem, y, mask, table, vae, writer, source, device, summary) -> None:
    """Both clips of a preference pair, in one bucket, as one item (ids `<key>#chosen` / `#rejected`)."""

    def samples():
        clips = read_pair(item, table, cfg.fps)
        return [
            _sample(f"{item.key}#{role}", clip, _encode(vae, clip, device), y, mask, source, item.caption,
                    pair=item.key, role=role, path=path)
            for role, clip, path in zip(("chosen", "rejected"), clips, (item.chosen, item.rejected), strict=True)
        ]

    _write(writer, item, y, samples, summary)


def _write(writer: DatasetWriter, item, y, make_samples, summary: PrepSummary) -> None:
    """Write the item's samples, or record why it failed (one bad input never stops the run)."""
    try:
        if not torch.isfinite(y).all():
            raise MediaError("encode_error", "text encoder returned non-finite features")
        samples = make_samples()
    except MediaError as err:
        _fail(writer, item, err.reason, err.detail, summary)
        return
    except Exception as err:  # noqa: BLE001 - one bad input never stops the run
        _fail(writer, item, "error", f"{type(err).__name__}: {err}", summary)
        return
    writer.add_item(item.key, samples)
    summary.written += 1
    summary.clips += len(samples)


def _fail(writer: DatasetWriter, item: PrepItem | PairItem, reason: str, detail: str, summary: PrepSummary) -> None:
    log.warning(f"prep: {item.key}: {reason} ({detail})")
    writer.record_failure(item.key, reason, detail)
    summary.failures[reason] += 1
