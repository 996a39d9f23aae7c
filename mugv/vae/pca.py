"""A linear PCA autoencoder: the video VAE's stand-in for CPU demos and smoke runs.

It keeps the VAE's interface and latent geometry (mugv.vae.VideoVAE): pixels [B, 3, 8k+1, H, W]
in [-1, 1] <-> normalised latents [B, 24, k+1, H/8, W/8]. As in the VAE, latent frame 0 holds
pixel frame 0 alone and latent frame j >= 1 the 8 pixel frames 8(j-1)+1 .. 8j. Each 8x8 pixel
patch of frame 0 (192 values) is projected on its own PCA basis, each 8x8x8 block of a later
group (1536 values) on another, both to 24 components, which are then normalised per channel
as the VAE does: z = (coefficient - shift) / scale.

Saved as safetensors + a JSON spec next to it of kind "pca", one of mugv.sampling's built-in
autoencoder kinds, so `mugv sample --vae <spec>` and training previews load it like a VAE.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from mugv.utils.logging import get_logger
from mugv.vae import latent_frames

T, S = 8, 8  # pixel frames per latent frame, pixels per latent pixel
FIRST_DIM, GROUP_DIM = 3 * S * S, 3 * T * S * S  # 192, 1536
KIND = "pca"

log = get_logger("vae")


@dataclass
class PCAConfig:
    latent_channels: int = 24


class PCAAutoencoder(nn.Module):
    """Pixels [B, 3, 8k+1, H, W] <-> latents [B, C, k+1, H/8, W/8] by two fixed linear maps."""

    def __init__(self, latent_channels: int = 24):
        super().__init__()
        self.config = PCAConfig(latent_channels)
        c = latent_channels
        for name, dim in (("first", FIRST_DIM), ("group", GROUP_DIM)):
            self.register_buffer(f"{name}_mean", torch.zeros(dim))
            self.register_buffer(f"{name}_basis", torch.zeros(dim, c))  # orthonormal columns
            self.register_buffer(f"{name}_shift", torch.zeros(c))
            self.register_buffer(f"{name}_scale", torch.ones(c))

    latent_frames = staticmethod(latent_frames)

    def latent_shape(self, frames: int, height: int, width: int) -> tuple[int, int, int]:
        if height % S or width % S:
            raise ValueError(f"frame size {height}x{width} is not a multiple of {S}")
        return latent_frames(frames), height // S, width // S

    # -- blocks <-> pixels -------------------------------------------------------------------

    @staticmethod
    def _blocks(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, 3, 8k+1, H, W] -> (first [B, h, w, 192], groups [B, k, h, w, 1536])."""
        b, _, f, hp, wp = pixels.shape
        h, w, k = hp // S, wp // S, (f - 1) // T
        first = pixels[:, :, 0].reshape(b, 3, h, S, w, S).permute(0, 2, 4, 1, 3, 5)  # [B, h, w, 3, 8, 8]
        groups = pixels[:, :, 1:].reshape(b, 3, k, T, h, S, w, S).permute(0, 2, 4, 6, 1, 3, 5, 7)
        return first.reshape(b, h, w, FIRST_DIM), groups.reshape(b, k, h, w, GROUP_DIM)

    @staticmethod
    def _pixels(first: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """Inverse of _blocks: (first [B, h, w, 192], groups [B, k, h, w, 1536]) -> [B, 3, 8k+1, 8h, 8w]."""
        b, h, w, _ = first.shape
        k = groups.shape[1]
        f0 = first.reshape(b, h, w, 3, S, S).permute(0, 3, 1, 4, 2, 5).reshape(b, 3, 1, h * S, w * S)
        # [B, k, h, w, 3, 8, 8, 8] -> [B, 3, k, 8, h, 8, w, 8]
        rest = groups.reshape(b, k, h, w, 3, T, S, S).permute(0, 4, 1, 5, 2, 6, 3, 7)
        return torch.cat([f0, rest.reshape(b, 3, k * T, h * S, w * S)], dim=2)

    # -- the VAE interface -------------------------------------------------------------------

    def _check_pixels(self, pixels: torch.Tensor) -> None:
        if pixels.dim() != 5 or pixels.shape[1] != 3:
            raise ValueError(f"pixels must be [B, 3, F, H, W], got shape {tuple(pixels.shape)}")
        self.latent_shape(pixels.shape[2], *pixels.shape[3:])

    def encode(self, pixels: torch.Tensor, sample: bool = False, generator=None) -> torch.Tensor:
        """[B, 3, 8k+1, H, W] in [-1, 1] -> normalised latents [B, C, k+1, H/8, W/8].
        (`sample` and `generator` exist for VideoVAE compatibility: the map is deterministic.)"""
        self._check_pixels(pixels)
        first, groups = self._blocks(pixels.to(self.first_mean.dtype))
        z0 = self._project(first, "first")[:, None]  # [B, 1, h, w, C]
        zs = self._project(groups, "group")  # [B, k, h, w, C]
        return torch.cat([z0, zs], dim=1).permute(0, 4, 1, 2, 3).contiguous()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """[B, C, T, h, w] normalised latents -> pixels [B, 3, 8(T-1)+1, 8h, 8w] (not clamped)."""
        c = self.config.latent_channels
        if latents.dim() != 5 or latents.shape[1] != c:
            raise ValueError(f"latents must be [B, {c}, T, h, w], got shape {tuple(latents.shape)}")
        z = latents.to(self.first_mean.dtype).permute(0, 2, 3, 4, 1)  # [B, T, h, w, C]
        return self._pixels(self._unproject(z[:, 0], "first"), self._unproject(z[:, 1:], "group"))

    def _project(self, blocks: torch.Tensor, name: str) -> torch.Tensor:
        p = self._params(name)
        return ((blocks - p["mean"]) @ p["basis"] - p["shift"]) / p["scale"]

    def _unproject(self, z: torch.Tensor, name: str) -> torch.Tensor:
        p = self._params(name)
        return (z * p["scale"] + p["shift"]) @ p["basis"].T + p["mean"]

    def _params(self, name: str) -> dict[str, torch.Tensor]:
        return {k: getattr(self, f"{name}_{k}") for k in ("mean", "basis", "shift", "scale")}

    # -- fitting and files -------------------------------------------------------------------

    @classmethod
    def fit(cls, clips: Iterable[torch.Tensor], latent_channels: int = 24, seed: int = 0) -> PCAAutoencoder:
        """Fit on pixel clips [3, 8k+1, H, W] in [-1, 1] (images are clips of 1 frame)."""
        firsts, groups = [], []
        for clip in clips:
            f, g = cls._blocks(clip[None].float())
            firsts.append(f.reshape(-1, FIRST_DIM))
            groups.append(g.reshape(-1, GROUP_DIM))
        groups = [g for g in groups if len(g)]
        if not groups:
            raise ValueError("PCAAutoencoder.fit needs at least one clip of 9 or more frames")
        model = cls(latent_channels)
        for name, data in (("first", torch.cat(firsts)), ("group", torch.cat(groups))):
            mean, basis = _principal_axes(data, latent_channels, seed)
            coeff = (data - mean) @ basis  # [N, C]
            params = {
                "mean": mean,
                "basis": basis,
                "shift": coeff.mean(0),
                "scale": coeff.std(0).clamp_min(1e-6),
            }
            for k, v in params.items():
                getattr(model, f"{name}_{k}").copy_(v)
        return model.eval()

    def save(self, path: str) -> str:
        """Write `path` (safetensors) and `<path minus extension>.json` (the loader spec); returns
        the spec's path, which `mugv sample --vae` and load_pca_autoencoder accept."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, path)
        spec_path = os.path.splitext(path)[0] + ".json"
        spec = {
            "kind": KIND,
            "weights": os.path.basename(path),
            "latent_channels": self.config.latent_channels,
        }
        with open(spec_path, "w") as f:
            json.dump(spec, f, indent=2)
        return spec_path

    @classmethod
    def load(cls, path: str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        """From the safetensors file or its JSON spec."""
        if path.endswith(".json"):
            with open(path) as f:
                spec = json.load(f)
            if "weights" not in spec:
                raise ValueError(f"{path}: spec has no 'weights' entry")
            path = os.path.join(os.path.dirname(path), spec["weights"])
        if not os.path.isfile(path):
            raise FileNotFoundError(f"PCA autoencoder weights not found: {path}")
        sd = load_file(path)
        if "first_basis" not in sd:
            raise ValueError(f"{path}: not a PCA autoencoder file (no 'first_basis'; keys {sorted(sd)[:4]})")
        model = cls(sd["first_basis"].shape[1])
        model.load_state_dict(sd, strict=True)
        return model.to(device, dtype).eval()


def load_pca_autoencoder(weights: str | None, spec: dict, device: torch.device, dtype: torch.dtype):
    """The loader of autoencoder kind "pca" (mugv.sampling.AUTOENCODER_KINDS)."""
    if weights is None:
        raise ValueError("a PCA autoencoder spec needs 'weights' (the .safetensors file)")
    return PCAAutoencoder.load(weights, device, dtype)


def _principal_axes(
    data: torch.Tensor, k: int, seed: int, iters: int = 10
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean [D], top-k principal axes [D, k]) of data [N, D], by block power iteration on the
    covariance from a seeded start (deterministic; far quicker than a full eigh at D = 1536)."""
    n, d = data.shape
    if k > d:
        raise ValueError(f"{k} components asked of {d}-dimensional data")
    mean = data.mean(0)
    centred = data - mean
    cov = (centred.T @ centred).double() / max(n - 1, 1)  # [D, D]
    q = min(d, 2 * k)
    basis = torch.randn(d, q, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    for _ in range(iters):
        basis, _ = torch.linalg.qr(cov @ basis)
    evals, evecs = torch.linalg.eigh(basis.T @ cov @ basis)  # ascending
    axes = basis @ evecs[:, -k:].flip(1)  # [D, k], largest variance first
    axes = axes * torch.where(axes.sum(0) < 0, -1.0, 1.0)  # fixed signs
    return mean, axes.float()


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two pixel tensors in [-1, 1] (peak-to-peak 2)."""
    mse = float(((a.float() - b.float()) ** 2).mean())
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(4.0 / mse)).item()
