"""Text/image-to-video sampling: prompts -> T5 -> Euler rectified-flow sampler -> autoencoder decode.

    model = load_model("hf_dir_or_ckpt_or_dit.pt")
    vae = load_autoencoder("vae.pt")
    video = generate(model, T5TextEncoder("t5/"), vae, ["a cat"], num_frames=105, height=720, width=1280)
    write_video("out.mp4", to_uint8_frames(video[0]), fps=30)

The defaults reproduce the release pipeline (SPEC 4 "Release sampling defaults": its negative
prompt, the " aesthetic score: 6.0." suffix, the shift ratio from sizes in the model dtype, Pillow
bicubic resize of the reference image, and the reference image's own pixels as frame 0), each
switchable through mugv.diffusion.SamplerConfig's fields (or the matching keyword arguments).

For one GPU the steps can be run apart, each model freed before the next is loaded:
encode_prompts (T5) -> encode_reference (autoencoder) -> sample_latents (DiT) -> decode_latents.

Autoencoders are pluggable: anything with encode(pixels [B, 3, F, H, W] in [-1, 1]) -> latents
[B, C, T, h, w] and decode(latents) -> pixels. `load_autoencoder(path)` picks a registered loader
by *kind*; no file can name code to import:
  1. path is a .json file: the spec itself ({"kind": ..., "weights": file relative to the json, ...});
  2. else a spec next to the weights: `<path>.json` or `<path minus extension>.json`;
  3. else kind "video_vae" (a release vae.pt).
Built in: kind "video_vae" (VideoVAE.from_release; optional "config": VideoVAEConfig fields) and
kind "pca" (mugv.vae.pca, the CPU stand-in); register_autoencoder(kind, loader) adds others. Latent sizes
come from the autoencoder's `latent_shape(frames, height, width)` if it has one, else the VideoVAE
rule (8k+1 frames -> k+1, 8x spatial).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from mugv.diffusion import RELEASE_NEGATIVE_PROMPT, RELEASE_PROMPT_SUFFIX, SamplerConfig, euler_sample
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


def _load_pca(weights: str | None, spec: dict, device: torch.device, dtype: torch.dtype):
    from mugv.vae.pca import load_pca_autoencoder

    return load_pca_autoencoder(weights, spec, device, dtype)


AUTOENCODER_KINDS: dict[str, AutoencoderLoader] = {"video_vae": _load_video_vae, "pca": _load_pca}


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
        raise ValueError(
            f"{path}: unknown autoencoder kind {kind!r}; known: {sorted(AUTOENCODER_KINDS)} "
            "(register others with mugv.sampling.register_autoencoder)"
        )
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
    lora: str | None = None,
) -> MUGDiT:
    """A plain MUGDiT (eval) from an HF directory, a release dit.pt (config inferred from shapes
    unless given) or a Megatron checkpoint / run directory (`ema` picks its EMA weights; a LoRA
    checkpoint gives its base with the adapters merged). `lora`: an adapter directory
    (`mugv convert to-hf --lora-only`, PEFT-style) merged into the weights (fp32 sum, then `dtype`)."""
    from mugv.checkpoint.weights import load_release_weights
    from mugv.convert import ReleaseSource
    from mugv.convert.sources import is_hf_dir

    if os.path.isfile(path) or is_hf_dir(path):
        source = ReleaseSource(path, config)
        config, sd = source.config, dict(source.items())
    else:
        config, sd = load_release_weights(path, ema)
    if lora:
        from mugv.models.lora import apply_adapter

        model = apply_adapter(MUGDiT.from_state_dict(config, sd, "cpu"), lora)
        sd = model.state_dict()
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


def image_to_pixels(image, height: int, width: int, resample: str = "bicubic") -> torch.Tensor:
    """An image (path, or uint8 [H, W, 3]) -> fp32 [3, height, width] in [-1, 1], resized to cover
    the target and centre-cropped by mugv.utils.video.resize_crop, scaled as the release does
    ((x / 255 - 0.5) / 0.5)."""
    from mugv.utils.video import read_image, resize_crop

    arr = read_image(image) if isinstance(image, str | os.PathLike) else image
    x = torch.from_numpy(resize_crop(arr, height, width, resample)).permute(2, 0, 1).float()  # [3, h, w]
    return (x / 255.0 - 0.5) / 0.5


def _model_device_dtype(model) -> tuple[torch.device, torch.dtype]:
    """A module's parameter device and dtype; a velocity callable's `device` / `dtype` attributes."""
    p = next(model.parameters(), None) if isinstance(model, torch.nn.Module) else None
    if p is not None:
        return p.device, p.dtype
    return torch.device(getattr(model, "device", "cpu")), getattr(model, "dtype", torch.float32)


@dataclass
class TextConditioning:
    """Prompt encodings for the sampler: y [B, 1, L, Ct], mask [B, L]; the negative prompt's
    y_neg [1, 1, L', Ct] / mask_neg [1, L'] (None: no CFG). Small: keep it, free the encoder."""

    y: torch.Tensor
    mask: torch.Tensor
    y_neg: torch.Tensor | None = None
    mask_neg: torch.Tensor | None = None

    def to(self, device) -> TextConditioning:
        move = lambda t: None if t is None else t.to(device)
        return TextConditioning(move(self.y), move(self.mask), move(self.y_neg), move(self.mask_neg))


@torch.no_grad()
def encode_prompts(
    text_encoder,
    prompts: Sequence[str],
    negative_prompt: str | None = RELEASE_NEGATIVE_PROMPT,
    prompt_suffix: str = RELEASE_PROMPT_SUFFIX,
) -> TextConditioning:
    """Encode `prompts` (each + prompt_suffix) and, unless negative_prompt is None, the negative
    prompt (no suffix, as the release). `text_encoder.encode(list) -> (y, mask)`."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    y, mask = text_encoder.encode([p + prompt_suffix for p in prompts])
    if negative_prompt is None:
        return TextConditioning(y, mask)
    return TextConditioning(y, mask, *text_encoder.encode([negative_prompt]))


@torch.no_grad()
def encode_reference(
    autoencoder, image, height: int, width: int, resample: str = "bicubic"
) -> tuple[torch.Tensor, torch.Tensor]:
    """I2V reference -> (pixels fp32 [3, height, width] in [-1, 1], latent fp32 [1, C, 1, h, w])."""
    pixels = image_to_pixels(image, height, width, resample)
    device, dtype = _model_device_dtype(autoencoder)
    return pixels, autoencoder.encode(pixels[None, :, None].to(device, dtype)).float()


@torch.no_grad()
def decode_latents(autoencoder, latents: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
    """Latents [B, C, T, h, w] -> videos fp32 [B, 3, F, H, W] in [-1, 1] on the CPU (a VideoVAE
    decodes chunk by chunk straight to the CPU). reference [3, H, W]: frame 0 of every video is
    these pixels (in the autoencoder's dtype, as the release) instead of the decoded latent 0."""
    device, dtype = _model_device_dtype(autoencoder)
    z = latents.to(device, dtype)
    from mugv.vae import VideoVAE

    video = autoencoder.decode(z, out_device="cpu") if isinstance(autoencoder, VideoVAE) else autoencoder.decode(z)
    video = video.float().cpu()
    if reference is not None:
        video[:, :, 0] = reference.to(dtype).float()
    return video.clamp(-1, 1)


@torch.no_grad()
def sample_latents(
    model: MUGDiT | Callable,
    text_encoder,
    prompts: Sequence[str],
    latent_shape: tuple[int, int, int],
    negative_prompt: str = RELEASE_NEGATIVE_PROMPT,
    steps: int = 25,
    guidance: float = 4.0,
    seed: int = 0,
    cond_latent: torch.Tensor | None = None,
    fps: float = 30.0,
    latent_channels: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    shift_ratio: float = 0.0,
    *,
    prompt_suffix: str = RELEASE_PROMPT_SUFFIX,
    ratio_in_model_dtype: bool = True,
) -> torch.Tensor:
    """Denoised latents [B, C, T, h, w] (fp32) for `prompts`.

    text_encoder: `encode(list) -> (y, mask)`, or a TextConditioning from encode_prompts (then
    prompts, negative_prompt and prompt_suffix are not used; only len(prompts) must match).
    cond_latent [B or 1, C, 1, h, w]: I2V first-frame latent. The noise is drawn on the CPU from
    `seed`, so it does not depend on the device. model: a MUGDiT or any velocity callable
    (mugv.diffusion.euler_sample); its compute dtype is its parameters' dtype."""
    if isinstance(prompts, str):
        prompts = [prompts]
    device, dtype = _model_device_dtype(model)
    C = latent_channels or (model.config.in_channels if isinstance(model, MUGDiT) else 24)
    text = text_encoder
    if not isinstance(text, TextConditioning):
        text = encode_prompts(text, prompts, negative_prompt if guidance != 1.0 else None, prompt_suffix)
    if text.y.shape[0] != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but the text conditioning holds {text.y.shape[0]}")
    expect = model.config.caption_channels if isinstance(model, MUGDiT) else text.y.shape[-1]
    if text.y.shape[-1] != expect:
        raise ValueError(f"text encoder gives {text.y.shape[-1]} channels, the model expects {expect}")
    text = text.to(device)
    B = len(prompts)
    noise = torch.randn(B, C, *latent_shape, generator=torch.Generator().manual_seed(seed)).to(device)
    if cond_latent is not None:
        cond_latent = cond_latent.to(device, torch.float32).expand(B, -1, -1, -1, -1)
    cfg = SamplerConfig(
        num_steps=steps, guidance_scale=guidance, fps=fps, shift_ratio=shift_ratio,
        ratio_in_model_dtype=ratio_in_model_dtype,
    )  # fmt: skip
    return euler_sample(
        model, noise, text.y, text.mask, text.y_neg, text.mask_neg, cfg, cond_latent, progress, dtype
    )


@torch.no_grad()
def generate(
    model: MUGDiT | Callable,
    text_encoder,
    autoencoder,
    prompts: Sequence[str],
    negative_prompt: str = RELEASE_NEGATIVE_PROMPT,
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
    *,
    prompt_suffix: str = RELEASE_PROMPT_SUFFIX,
    ratio_in_model_dtype: bool = True,
    reference_frame: bool = True,
    image_resample: str = "bicubic",
) -> torch.Tensor:
    """Videos [B, 3, F, H, W] in [-1, 1] (fp32, CPU) for `prompts`: encode_prompts ->
    encode_reference -> sample_latents -> decode_latents with every model held at once.

    image: I2V reference (path or uint8 [H, W, 3]), encoded as latent frame 0 and held fixed;
    reference_frame: the output's frame 0 is its resized pixels. latent_shape (T, h, w) overrides
    the size derived from num_frames x height x width."""
    latent_shape = latent_shape or latent_size(autoencoder, num_frames, height, width)
    pixels = cond = None
    if image is not None:
        pixels, cond = encode_reference(autoencoder, image, height, width, image_resample)
    latents = sample_latents(
        model, text_encoder, prompts, latent_shape, negative_prompt, steps, guidance, seed, cond, fps,
        progress=progress, shift_ratio=shift_ratio, prompt_suffix=prompt_suffix,
        ratio_in_model_dtype=ratio_in_model_dtype,
    )  # fmt: skip
    return decode_latents(autoencoder, latents, pixels if reference_frame else None)
