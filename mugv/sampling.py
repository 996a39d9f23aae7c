"""Text/image-to-video sampling: prompts -> T5 -> Euler rectified-flow sampler -> autoencoder decode.

    model = load_model("hf_dir_or_ckpt_or_dit.pt")
    vae = load_autoencoder("vae.pt")
    video = generate(model, T5TextEncoder("t5/"), vae, ["a cat"], num_frames=105, height=720, width=1280)
    write_video("out.mp4", to_uint8_frames(video[0]), fps=30)

Autoencoders are pluggable: anything with encode(pixels [B, 3, F, H, W] in [-1, 1]) -> latents
[B, C, T, h, w] and decode(latents) -> pixels. `load_autoencoder(path)` picks a loader by *kind*:
  1. path is a .json file: the spec itself ({"kind": ..., "weights": file relative to the json, ...});
  2. else a spec next to the weights: `<path>.json` or `<path minus extension>.json`;
  3. else kind "video_vae" (a release vae.pt).
Kinds: "video_vae" (VideoVAE.from_release; optional "config": VideoVAEConfig fields) and
"factory" ({"factory": "package.module:function"} called as function(weights, spec, device, dtype));
more with register_autoencoder(kind, loader). Latent sizes come from the autoencoder's
`latent_shape(frames, height, width)` if it has one, else the VideoVAE rule (8k+1 frames -> k+1,
8x spatial).
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from mugv.diffusion import SamplerConfig, euler_sample
from mugv.models.mugdit import MUGDiT, MUGDiTConfig
from mugv.utils.logging import get_logger

log = get_logger(__name__)
SPATIAL_FACTOR = 8

# ---------------------------------------------------------------------------------------------
# loading
# ---------------------------------------------------------------------------------------------

AutoencoderLoader = Callable[[str | None, dict, torch.device, torch.dtype], object]


def _load_video_vae(weights, spec, device, dtype):
    from mugv.vae import VideoVAE, VideoVAEConfig

    if weights is None:
        raise ValueError("autoencoder kind 'video_vae' needs weights (a vae.pt)")
    return VideoVAE.from_release(
        weights, VideoVAEConfig(**spec.get("config", {})), device=device, dtype=dtype
    )


def _load_factory(weights, spec, device, dtype):
    target = spec.get("factory", "")
    module, _, name = target.partition(":")
    if not module or not name:
        raise ValueError(
            f'autoencoder kind \'factory\' needs "factory": "package.module:function", got {target!r}'
        )
    return getattr(importlib.import_module(module), name)(weights, spec, device, dtype)


AUTOENCODER_KINDS: dict[str, AutoencoderLoader] = {"video_vae": _load_video_vae, "factory": _load_factory}


def register_autoencoder(kind: str, loader: AutoencoderLoader) -> None:
    """Make `{"kind": kind}` specs load with loader(weights path or None, spec, device, dtype)."""
    AUTOENCODER_KINDS[kind] = loader


def autoencoder_spec(path: str) -> tuple[str | None, dict]:
    """(weights path or None, spec dict) of an autoencoder path, by the rule in the module doc."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"autoencoder not found: {path}")
    if path.endswith(".json"):
        with open(path) as f:
            spec = json.load(f)
        weights = spec.get("weights")
        return (None if weights is None else os.path.join(os.path.dirname(path), weights)), spec
    for side in (f"{path}.json", os.path.splitext(path)[0] + ".json"):
        if os.path.isfile(side):
            with open(side) as f:
                return path, json.load(f)
    return path, {"kind": "video_vae"}


def load_autoencoder(path: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    weights, spec = autoencoder_spec(path)
    kind = spec.get("kind", "video_vae")
    if kind not in AUTOENCODER_KINDS:
        raise ValueError(f"{path}: unknown autoencoder kind {kind!r}; known: {sorted(AUTOENCODER_KINDS)}")
    model = AUTOENCODER_KINDS[kind](weights, spec, torch.device(device), dtype)
    for method in ("encode", "decode"):
        if not callable(getattr(model, method, None)):
            raise TypeError(f"{path}: the {kind!r} autoencoder has no {method}() method")
    return model.eval() if hasattr(model, "eval") else model


def load_model(
    path: str,
    config: MUGDiTConfig | None = None,
    ema: bool = False,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> MUGDiT:
    """A plain MUGDiT (eval) from an HF directory, a release dit.pt (config inferred from shapes
    unless given) or a Megatron checkpoint / run directory (`ema` picks its EMA weights)."""
    from mugv.checkpoint.weights import load_release_weights
    from mugv.convert import ReleaseSource
    from mugv.convert.sources import is_hf_dir

    if os.path.isfile(path) or is_hf_dir(path):
        source = ReleaseSource(path, config)
        config, sd = source.config, dict(source.items())
    else:
        config, sd = load_release_weights(path, ema)
    model = MUGDiT.from_state_dict(config, {k: v.to(dtype) for k, v in sd.items()}, device)
    return model.eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------------------------


def latent_size(autoencoder, frames: int, height: int, width: int) -> tuple[int, int, int]:
    """(T, h, w) of the latent for a `frames` x `height` x `width` video."""
    if hasattr(autoencoder, "latent_shape"):
        return tuple(autoencoder.latent_shape(frames, height, width))
    from mugv.vae import latent_frames

    if height % SPATIAL_FACTOR or width % SPATIAL_FACTOR:
        raise ValueError(f"height {height} and width {width} must be multiples of {SPATIAL_FACTOR}")
    return latent_frames(frames), height // SPATIAL_FACTOR, width // SPATIAL_FACTOR


def image_to_pixels(image, height: int, width: int) -> torch.Tensor:
    """An image (path, or uint8 [H, W, 3]) -> [3, height, width] in [-1, 1]: resized to cover the
    target (aspect kept, antialiased) and centre-cropped."""
    from mugv.utils.video import read_image

    arr = read_image(image) if isinstance(image, str) else image
    x = torch.as_tensor(arr).permute(2, 0, 1)[None].float()  # [1, 3, H, W]
    s = max(height / x.shape[2], width / x.shape[3])
    size = (max(height, round(x.shape[2] * s)), max(width, round(x.shape[3] * s)))
    x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    top, left = (size[0] - height) // 2, (size[1] - width) // 2
    return (x[0, :, top : top + height, left : left + width] / 127.5 - 1).clamp(-1, 1)


def _model_device_dtype(model) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters(), None) if isinstance(model, torch.nn.Module) else None
    return (p.device, p.dtype) if p is not None else (torch.device("cpu"), torch.float32)


@torch.no_grad()
def sample_latents(
    model: MUGDiT | Callable,
    text_encoder,
    prompts: Sequence[str],
    latent_shape: tuple[int, int, int],
    negative_prompt: str = "",
    steps: int = 25,
    guidance: float = 4.0,
    seed: int = 0,
    cond_latent: torch.Tensor | None = None,
    fps: float = 30.0,
    latent_channels: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    shift_ratio: float = 0.0,
) -> torch.Tensor:
    """Denoised latents [B, C, T, h, w] (fp32) for `prompts`. `text_encoder.encode(list) -> (y, mask)`.
    cond_latent [B or 1, C, 1, h, w]: I2V first-frame latent. The noise is drawn on the CPU from
    `seed`, so it does not depend on the device."""
    if isinstance(prompts, str):
        prompts = [prompts]
    device, _ = _model_device_dtype(model)
    C = latent_channels or (model.config.in_channels if isinstance(model, MUGDiT) else 24)
    B = len(prompts)
    y, mask = text_encoder.encode(list(prompts))
    expect = model.config.caption_channels if isinstance(model, MUGDiT) else y.shape[-1]
    if y.shape[-1] != expect:
        raise ValueError(f"text encoder gives {y.shape[-1]} channels, the model expects {expect}")
    y_neg = mask_neg = None
    if guidance != 1.0:
        y_neg, mask_neg = text_encoder.encode([negative_prompt])
        y_neg, mask_neg = y_neg.to(device), mask_neg.to(device)
    noise = torch.randn(B, C, *latent_shape, generator=torch.Generator().manual_seed(seed)).to(device)
    if cond_latent is not None:
        cond_latent = cond_latent.to(device, torch.float32).expand(B, -1, -1, -1, -1)
    cfg = SamplerConfig(num_steps=steps, guidance_scale=guidance, fps=fps, shift_ratio=shift_ratio)
    return euler_sample(
        model, noise, y.to(device), mask.to(device), y_neg, mask_neg, cfg, cond_latent, progress
    )


@torch.no_grad()
def generate(
    model: MUGDiT | Callable,
    text_encoder,
    autoencoder,
    prompts: Sequence[str],
    negative_prompt: str = "",
    num_frames: int = 105,
    height: int = 720,
    width: int = 1280,
    steps: int = 25,
    guidance: float = 4.0,
    seed: int = 0,
    image=None,
    fps: float = 30.0,
    latent_shape: tuple[int, int, int] | None = None,
    progress: Callable[[int, int], None] | None = None,
    shift_ratio: float = 0.0,
) -> torch.Tensor:
    """Videos [B, 3, F, H, W] in [-1, 1] (fp32, CPU) for `prompts`.

    image: I2V reference (path or uint8 [H, W, 3]), encoded as latent frame 0 and held fixed.
    latent_shape (T, h, w) overrides the size derived from num_frames x height x width."""
    latent_shape = latent_shape or latent_size(autoencoder, num_frames, height, width)
    ae_device, ae_dtype = _model_device_dtype(autoencoder)
    cond = None
    if image is not None:
        pixels = image_to_pixels(image, height, width)
        cond = autoencoder.encode(pixels[None, :, None].to(ae_device, ae_dtype)).float()  # [1, C, 1, h, w]
    latents = sample_latents(
        model, text_encoder, prompts, latent_shape, negative_prompt, steps, guidance, seed, cond, fps,
        progress=progress, shift_ratio=shift_ratio,
    )  # fmt: skip
    video = autoencoder.decode(latents.to(ae_device, ae_dtype))
    return video.float().clamp(-1, 1).cpu()
