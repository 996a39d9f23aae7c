"""Peak-memory estimate of `mugv sample` (printed by `mugv sample --dry-run`), without loading weights.

`mugv sample` runs three phases, each model freed before the next is loaded, so the peak is the
largest phase:
  text     T5 weights (+ its small activations)
  sample   DiT weights + autoencoder weights + one CFG forward's largest live activations
  decode   autoencoder weights + one decode chunk's activations
Parameter counts are the real ones: each model is built on the meta device from its config.

DiT activations: mugv.models.memory (forward-only, one block's live tensors at a time).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mugv.models.memory import dit_activation_bytes, dtype_bytes

GIB = 1024**3


def count_parameters(module_fn) -> int:
    """Parameters of the module built by module_fn() on the meta device (no memory, no weights)."""
    with torch.device("meta"):
        module = module_fn()
    return sum(p.numel() for p in module.parameters())


@dataclass
class SampleMemory:
    """Bytes per phase; `peak` is the largest."""

    t5_params: int
    dit_params: int
    ae_params: int
    dtype: torch.dtype
    dit_activations: int
    decode_activations: int

    @property
    def phases(self) -> dict[str, int]:
        b = dtype_bytes(self.dtype)
        return {
            "text": self.t5_params * b,
            "sample": (self.dit_params + self.ae_params) * b + self.dit_activations,
            "decode": self.ae_params * b + self.decode_activations,
        }

    @property
    def peak(self) -> int:
        return max(self.phases.values())

    def table(self) -> str:
        b = dtype_bytes(self.dtype)
        lines = [
            f"parameters: DiT {self.dit_params:,}  T5 {self.t5_params:,}  autoencoder {self.ae_params:,} "
            f"({self.dtype}, {b} bytes each)",
            f"  text    T5 weights {self.t5_params * b / GIB:.2f} GiB",
            f"  sample  DiT weights {self.dit_params * b / GIB:.2f} GiB + autoencoder {self.ae_params * b / GIB:.2f}"
            f" GiB + activations {self.dit_activations / GIB:.2f} GiB",
            f"  decode  autoencoder {self.ae_params * b / GIB:.2f} GiB + one chunk {self.decode_activations / GIB:.2f} GiB",
        ]
        phase, peak = max(self.phases.items(), key=lambda kv: kv[1])
        return "\n".join(lines + [f"estimated peak: {peak / GIB:.2f} GiB (phase {phase})"])


def video_vae_decode_bytes(vae_config, latent_shape, batch: int, dtype: torch.dtype) -> int:
    """Coarse: the largest decode chunk's temporal-decoder output plus four live full-resolution
    tensors of the 2D decoder's last block over `frame_batch` frames (the dominant terms)."""
    b = dtype_bytes(dtype)
    _, h, w = latent_shape
    temporal = batch * vae_config.feature_channels * 8 * vae_config.decode_chunk * h * w * b * 2
    spatial = batch * vae_config.frame_batch * vae_config.spatial_channels[0] * (8 * h) * (8 * w) * b * 4
    return temporal + spatial


def _t5_parameters(t5_dir: str) -> int:
    from transformers import AutoConfig, T5EncoderModel

    config = AutoConfig.from_pretrained(t5_dir, local_files_only=True)
    return count_parameters(lambda: T5EncoderModel(config))


def estimate_sample_memory(args, dtype: torch.dtype) -> SampleMemory:
    """The estimate for `mugv sample` args (--model or --config, --t5, --vae, sizes, --guidance)."""
    from mugv.convert import ReleaseSource, parse_config_arg
    from mugv.models.mugdit import MUGDiT
    from mugv.sampling import autoencoder_spec
    from mugv.vae import VideoVAE, VideoVAEConfig, latent_frames

    if args.config:
        config = parse_config_arg(args.config)
    elif args.model:
        config = ReleaseSource(args.model).config  # reads the header / shapes only
    else:
        raise ValueError("--dry-run needs --config or a --model dit.pt / HF directory")
    latent_shape = (latent_frames(args.frames), args.height // 8, args.width // 8)
    batch = 1 if args.guidance == 1.0 else 2
    _, spec = autoencoder_spec(args.vae)
    ae_params = decode = 0
    if spec.get("kind", "video_vae") == "video_vae":
        vae_config = VideoVAEConfig(**spec.get("config", {}))
        ae_params = count_parameters(lambda: VideoVAE(vae_config))
        decode = video_vae_decode_bytes(vae_config, latent_shape, 1, dtype)
    return SampleMemory(
        t5_params=_t5_parameters(args.t5),
        dit_params=count_parameters(lambda: MUGDiT(config)),
        ae_params=ae_params,
        dtype=dtype,
        dit_activations=dit_activation_bytes(config, latent_shape, batch, dtype),
        decode_activations=decode,
    )
