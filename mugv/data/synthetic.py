"""Random latent datasets in the mugv format, for tests and loader benchmarks."""

from __future__ import annotations

import torch

from mugv.data.store import DatasetWriter, PreparedSample


def write_synthetic_dataset(
    root: str,
    shapes: dict[tuple[int, int, int], int],
    text_dim: int = 32,
    text_len: int = 12,
    channels: int = 24,
    shard_bytes: int = 1 << 20,
    seed: int = 0,
    latent_dtype: torch.dtype = torch.float32,
) -> list[str]:
    """Write `count` samples of each latent shape (T, H, W); one item per sample. Returns the ids.

    Sample values are reproducible: latent = randn(seed, sample number), and the first latent
    value of sample k is overwritten with k so tests can tell samples apart.
    """
    g = torch.Generator().manual_seed(seed)
    writer = DatasetWriter(root, shard_bytes=shard_bytes, latent_dtype=latent_dtype)
    writer.write_meta(channels, text_dim, {"null": "", "negative": "bad quality"})
    writer.write_text_embeddings(
        {
            "null": (torch.zeros(1, text_dim), torch.ones(1, dtype=torch.bool)),
            "negative": (torch.randn(3, text_dim, generator=g), torch.ones(3, dtype=torch.bool)),
        }
    )
    ids, k = [], 0
    for (t, h, w), count in shapes.items():
        for _ in range(count):
            sid = f"s{k:06d}"
            latent = torch.randn(channels, t, h, w, generator=g)
            latent.view(-1)[0] = k
            n = 1 + k % text_len
            sample = PreparedSample(
                id=sid,
                latent=latent,
                y=torch.randn(n, text_dim, generator=g),
                mask=torch.ones(n, dtype=torch.bool),
                fps=24.0 if t > 1 else 1.0,
                num_frames=8 * (t - 1) + 1,
                height=8 * h,
                width=8 * w,
                task="t2v" if t > 1 else "t2i",
                source="synthetic",
                caption=f"sample {k}",
            )
            writer.add_item(sid, [sample])
            ids.append(sid)
            k += 1
    writer.close()
    return ids


def write_synthetic_pairs(
    root: str,
    shapes: dict[tuple[int, int, int], int],
    text_dim: int = 32,
    text_len: int = 12,
    channels: int = 24,
    offset: float = 1.0,
    seed: int = 0,
    direction_seed: int = 0,
) -> list[str]:
    """A preference-pairs dataset (mugv.data.pairs): `count` pairs of each latent shape (T, H, W).
    Pair k shares z = randn(seed, k) and a caption; its chosen clip is z + offset * u, its rejected
    clip z - offset * u, for one random direction u per shape (drawn from direction_seed, so two
    datasets of other seeds share it): chosen and rejected differ systematically. Returns the pair ids."""
    g = torch.Generator().manual_seed(seed)
    writer = DatasetWriter(root, shard_bytes=1 << 20)
    writer.write_meta(channels, text_dim, {"null": "", "negative": ""}, pairs=True)
    writer.write_text_embeddings({"null": (torch.zeros(1, text_dim), torch.ones(1, dtype=torch.bool)),
                                  "negative": (torch.zeros(1, text_dim), torch.ones(1, dtype=torch.bool))})
    ids, k = [], 0
    for (t, h, w), count in shapes.items():
        u = torch.randn(channels, t, h, w, generator=torch.Generator().manual_seed(direction_seed))
        for _ in range(count):
            pid = f"p{k:06d}"
            z = torch.randn(channels, t, h, w, generator=g)
            n = 1 + k % text_len
            y, mask = torch.randn(n, text_dim, generator=g), torch.ones(n, dtype=torch.bool)
            samples = [
                PreparedSample(
                    id=f"{pid}#{role}", latent=z + sign * offset * u, y=y, mask=mask,
                    fps=24.0 if t > 1 else 1.0, num_frames=8 * (t - 1) + 1, height=8 * h, width=8 * w,
                    task="t2v" if t > 1 else "t2i", source="synthetic", caption=f"pair {k}",
                    extra={"pair": pid, "role": role},
                )
                for role, sign in (("chosen", 1.0), ("rejected", -1.0))
            ]
            writer.add_item(pid, samples)
            ids.append(pid)
            k += 1
    writer.close()
    return ids
