"""Reading sample tensors: shard tensors are read with one positioned read straight into the
caller's buffer (no memory map, no intermediate copy); release .pt files through torch.load."""

from __future__ import annotations

import json
import os
import struct
from collections import OrderedDict

import torch

from mugv.data.store import SampleRecord, load_pt_latent

_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "BOOL": torch.bool,
    "I64": torch.int64,
    "I32": torch.int32,
    "U8": torch.uint8,
}
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")


def _float_or_raise(path: str, key: str, dtype: str) -> None:
    """Latents and text features are float; an integer tensor would be silently converted."""
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"{path}: {key} is stored as {dtype}, not a float type")


class _Shard:
    """An open safetensors file: its header (name -> dtype, shape, byte range) and descriptor."""

    def __init__(self, path: str):
        self.fd = os.open(path, os.O_RDONLY)
        try:
            size = os.fstat(self.fd).st_size
            head = os.pread(self.fd, 8, 0)
            if len(head) < 8:
                raise ValueError(f"{path}: {size} bytes, too short for a safetensors file")
            (n,) = struct.unpack("<Q", head)
            if n > min(size, 1 << 28):
                raise ValueError(f"{path}: header length {n} does not fit the file ({size} bytes)")
            meta = json.loads(os.pread(self.fd, n, 8))
            meta.pop("__metadata__", None)
            self.base = 8 + n
            self.entries = {k: (v["dtype"], tuple(v["shape"]), *v["data_offsets"]) for k, v in meta.items()}
            end = max((e[3] for e in self.entries.values()), default=0)
            if self.base + end != size:
                raise ValueError(
                    f"{path}: file has {size} bytes, header describes {self.base + end} (truncated?)"
                )
        except Exception:
            os.close(self.fd)
            raise
        self.path = path

    def read(self, key: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Tensor `key`; with `out` (contiguous, same shape) read into it, converting dtype if needed."""
        if key not in self.entries:
            raise KeyError(f"{self.path}: no tensor {key!r}")
        dtype_name, shape, start, end = self.entries[key]
        dtype = _DTYPES.get(dtype_name)
        if dtype is None:
            raise ValueError(f"{self.path}: {key} has unsupported dtype {dtype_name}")
        if out is not None and tuple(out.shape) != shape:
            raise ValueError(f"{self.path}: {key} has shape {list(shape)}, expected {list(out.shape)}")
        target = out if out is not None and out.dtype == dtype else torch.empty(shape, dtype=dtype)
        view = memoryview(target.view(torch.uint8).numpy() if target.numel() else bytearray(0)).cast("B")
        if len(view) != end - start:
            raise ValueError(
                f"{self.path}: {key} spans {end - start} bytes, shape {list(shape)} needs {len(view)}"
            )
        done = 0
        while done < len(view):
            n = os.preadv(self.fd, [view[done:]], self.base + start + done)
            if n <= 0:
                raise OSError(f"{self.path}: unexpected end of file reading {key}")
            done += n
        if out is not None and target is not out:
            out.copy_(target)
            return out
        return target

    def close(self) -> None:
        os.close(self.fd)


class TensorReader:
    """Loads samples, keeping up to `open_files` shard files open (per process)."""

    def __init__(self, open_files: int = 8, vae_stats: str = ""):
        self.open_files = open_files
        self._shards: OrderedDict[str, _Shard] = OrderedDict()
        self._stats_path = vae_stats
        self._stats: tuple[torch.Tensor, torch.Tensor] | None = None

    def _shard(self, path: str) -> _Shard:
        shard = self._shards.pop(path, None) or _Shard(path)
        self._shards[path] = shard
        while len(self._shards) > self.open_files:
            self._shards.popitem(last=False)[1].close()
        return shard

    def load_into(self, rec: SampleRecord, out: torch.Tensor, normalize: bool = True):
        """Latent of `rec` into `out` [C, T, H, W] (float32); returns (y [L, Ct] as stored, mask [L] bool).
        Raises on any problem. normalize=False leaves release "real" latents raw."""
        if rec.latent_key:
            shard = self._shard(rec.latent_file)
            for key in (rec.latent_key, rec.y_key):
                if key in shard.entries:
                    _float_or_raise(rec.latent_file, key, shard.entries[key][0])
            shard.read(rec.latent_key, out)
            y, mask = shard.read(rec.y_key), shard.read(rec.mask_key).bool()
        else:
            latent = load_pt_latent(rec.latent_file)
            if not latent.is_floating_point():
                raise ValueError(f"{rec.latent_file}: the latent is stored as {latent.dtype}, not a float type")
            if tuple(latent.shape) != tuple(out.shape):
                raise ValueError(f"{rec.latent_file}: shape {list(latent.shape)}, expected {list(out.shape)}")
            out.copy_(latent)
            if rec.release_source == "real" and normalize:
                shift, scale = self._vae_stats()
                out.sub_(shift.reshape(-1, 1, 1, 1)).div_(scale.reshape(-1, 1, 1, 1))
            text = torch.load(rec.text_file, map_location="cpu", weights_only=True)
            if not isinstance(text, dict) or "y" not in text or "mask" not in text:
                raise ValueError(f"{rec.text_file}: expected a dict with keys 'y' and 'mask'")
            if not text["y"].is_floating_point():
                raise ValueError(f"{rec.text_file}: y is stored as {text['y'].dtype}, not a float type")
            y, mask = text["y"].reshape(-1, text["y"].shape[-1]).float(), text["mask"].reshape(-1).bool()
        if y.dim() != 2 or mask.shape != y.shape[:1]:
            raise ValueError(
                f"{rec.text_file}: text of {rec.id} has y {tuple(y.shape)} / mask {tuple(mask.shape)}"
            )
        return y, mask

    def load(self, rec: SampleRecord, normalize: bool = True):
        """-> latent [C, T, H, W] float32, y [L, Ct] float32, mask [L] bool."""
        latent = torch.empty(rec.channels, *rec.shape)
        y, mask = self.load_into(rec, latent, normalize)
        return latent, y, mask

    def _vae_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._stats is None:
            if not self._stats_path:
                raise ValueError(
                    "release CSV row with source 'real' needs DataConfig.release_vae_stats "
                    "(a file with 'shift' and 'scale', e.g. vae.pt)"
                )
            sd = torch.load(self._stats_path, map_location="cpu", weights_only=True, mmap=True)
            if "shift" not in sd or "scale" not in sd:
                raise ValueError(f"{self._stats_path}: keys 'shift' and 'scale' not found")
            self._stats = (sd["shift"].float().flatten(), sd["scale"].float().flatten())
        return self._stats

    def __getstate__(self):  # open files do not cross process boundaries
        return {**self.__dict__, "_shards": OrderedDict()}

    def __del__(self):
        for shard in self._shards.values():
            shard.close()
