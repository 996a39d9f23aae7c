"""The demo's dataset, built through the real prep path: synthetic media -> PCA autoencoder fitted
on the clips as prep decodes them -> tiny random T5 -> `run_prep` -> a mugv latent dataset."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from mugv.data.buckets import BucketTable, BucketTableConfig
from mugv.data.prep import PrepConfig, read_captions, read_image, read_video, run_prep
from mugv.data.prep.media import is_image, to_unit_range
from mugv.demo.shapes import DemoMedia, write_demo_media
from mugv.utils.logging import get_logger
from mugv.vae.pca import PCAAutoencoder, psnr

log = get_logger("demo")


@dataclass
class DemoDataConfig:
    num_videos: int = 192  # clips: 2 shapes x 4 colours x 4 directions, ~6 of each at random sizes
    num_images: int = 128
    frames: int = 17  # 8k+1 -> k+1 latent frames
    size: int = 64  # square clips, pixels
    fps: float = 8.0
    seed: int = 0
    t5_dim: int = 64  # = the caption_channels of the mugdit_tiny preset
    text_length: int = 64  # T5 tokens (byte-level: the longest caption is ~60)


@dataclass
class DemoData:
    media: DemoMedia
    dataset: str  # mugv dataset directory (images + clips)
    t5: str  # tiny T5 directory
    autoencoder: str  # PCA autoencoder spec (.json), loadable by mugv.sampling.load_autoencoder
    psnr_video: float  # PCA round trip on the demo clips, dB
    psnr_image: float


def bucket_config(cfg: DemoDataConfig) -> BucketTableConfig:
    return BucketTableConfig(sizes=[f"{cfg.size}x{cfg.size}"], num_frames=[cfg.frames])


def load_prep_pixels(captions: str, cfg: DemoDataConfig) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The pixels prep will encode: (clips, images), each [3, F, H, W] in [-1, 1]."""
    table = BucketTable.from_config(bucket_config(cfg))
    clips, images = [], []
    for item in read_captions(captions):
        if is_image(item.path):
            images.append(to_unit_range(read_image(item.path, table, cfg.fps)[0].pixels)[0])
        else:
            clips.append(to_unit_range(read_video(item.path, table, cfg.fps, 1)[0].pixels)[0])
    return clips, images


def build_demo_data(out_dir: str, cfg: DemoDataConfig | None = None) -> DemoData:
    """Write media, fit and save the autoencoder, make the tiny T5 and prep the dataset under
    out_dir/{media, autoencoder, t5, dataset}."""
    from mugv.text import T5TextEncoder, make_tiny_t5

    cfg = cfg or DemoDataConfig()
    media = write_demo_media(
        os.path.join(out_dir, "media"),
        cfg.num_videos,
        cfg.num_images,
        cfg.frames,
        cfg.size,
        cfg.fps,
        cfg.seed,
    )
    clips, images = load_prep_pixels(media.captions, cfg)
    ae = PCAAutoencoder.fit(clips + images, seed=cfg.seed)
    data = DemoData(
        media=media,
        dataset=os.path.join(out_dir, "dataset"),
        t5=make_tiny_t5(os.path.join(out_dir, "t5"), d_model=cfg.t5_dim, seed=cfg.seed),
        autoencoder=ae.save(os.path.join(out_dir, "autoencoder", "pca_ae.safetensors")),
        psnr_video=_round_trip_psnr(ae, clips),
        psnr_image=_round_trip_psnr(ae, images),
    )
    log.info(
        f"PCA autoencoder: round-trip PSNR {data.psnr_video:.2f} dB on clips, {data.psnr_image:.2f} dB on images"
    )
    text = T5TextEncoder(data.t5, max_length=cfg.text_length, device="cpu")
    prep = PrepConfig(
        captions=media.captions,
        output=data.dataset,
        buckets=bucket_config(cfg),
        fps=cfg.fps,
        source="demo",
        text_dtype="float32",
    )
    prep.validate()
    summary = run_prep(prep, ae, text, rank=0, world_size=1)
    if summary.failures:
        raise RuntimeError(f"demo prep failed for some items: {summary.format()}")
    return data


def _round_trip_psnr(ae: PCAAutoencoder, pixels: list[torch.Tensor]) -> float:
    if not pixels:
        return float("nan")
    x = torch.stack(pixels)  # [N, 3, F, H, W]
    with torch.no_grad():
        return psnr(ae.decode(ae.encode(x)).clamp(-1, 1), x)
