"""On-disk latent datasets: the mugv sharded format (read and write) and the release CSV format.

mugv dataset directory:

    dataset.json                      {"format": "mugv-latents", "version": 1, "latent_channels": 24,
                                       "text_dim": Ct, "prompts": {"null": "", "negative": "..."}}
                                      (+ "pairs": true for preference pairs: mugv.data.pairs)
    text_null.safetensors             dataset-level text embeddings: "null.y" [L, Ct], "null.mask" [L],
                                      "negative.y", "negative.mask"
    shards/r00000-000003.safetensors  many samples each: "<id>.latent" [24, T, H, W],
                                      "<id>.y" [L, Ct] (trimmed to the caption's tokens), "<id>.mask" [L]
                                      (clips of one input share the text of their first clip)
    manifest/r00000-000003.jsonl      one JSON row per sample of that shard (see SampleRecord)
    failures/r00000.jsonl             prep failures of rank 0: {"item", "reason", "detail"}

A shard is written to a temporary name and renamed, then its manifest part is written the same
way, so a sample exists exactly when its manifest row does; an interrupted writer leaves at most
an orphan shard, which the next run of the same rank overwrites.

Release CSV: `sample_id,source,latent_path,text_feat_path`, paths relative to the CSV; latents are
`.pt` tensors [24, T, H, W] (a leading batch dim of 1 is allowed) and text `.pt` dicts
{'y': [1, 1, L, Ct], 'mask': [1, L]}. Rows with source "real" hold raw VAE latents and are
normalised on load with (z - shift) / scale; "generated" rows are used as stored.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import re
from dataclasses import dataclass, field

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mugv.data.buckets import bucket_name
from mugv.utils.checkpoint_io import write_json_atomic
from mugv.utils.logging import get_logger

FORMAT = "mugv-latents"
META = "dataset.json"
TEXT_NULL = "text_null.safetensors"
RELEASE_COLUMNS = ("sample_id", "source", "latent_path", "text_feat_path")

log = get_logger("data")


@dataclass
class SampleRecord:
    """One manifest row. Paths are absolute once loaded (relative to the dataset on disk)."""

    id: str
    shape: tuple[int, int, int]  # latent T, H, W
    task: str  # native task: "t2i" for images, "t2v" for videos ("i2v" if prepared as such)
    fps: float
    num_frames: int  # pixel frames
    height: int  # pixel size of the encoded clip
    width: int
    latent_file: str
    text_file: str
    latent_key: str = ""  # "" = the file is a release .pt holding only this tensor
    y_key: str = ""
    mask_key: str = ""
    caption_len: int = -1
    item: str = ""  # the prep input this came from (video/image path)
    source: str = ""
    caption: str = ""
    channels: int = 24
    release_source: str = ""  # release CSV rows: "real" or "generated"
    pair: str = ""  # preference pairs (mugv.data.pairs): the pair's id ...
    role: str = ""  # ... and this clip's role in it, "chosen" or "rejected"

    @property
    def bucket(self) -> str:
        return bucket_name(*self.shape)


@dataclass
class PreparedSample:
    """What prep hands to the writer for one clip."""

    id: str
    latent: torch.Tensor  # [24, T, H, W]
    y: torch.Tensor  # [L, Ct], L = the caption's token count
    mask: torch.Tensor  # [L] bool
    fps: float
    num_frames: int
    height: int
    width: int
    task: str
    source: str = ""
    caption: str = ""
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------- writing


class DatasetWriter:
    """Appends samples to a mugv dataset as rank `rank`; resumable and safe to interrupt.

    Call `add_item(item, samples)` with all clips of one input at once: a shard is only cut
    between items, so an input is either fully in the dataset or not at all.
    """

    def __init__(self, root: str, rank: int = 0, shard_bytes: int = 1 << 30, latent_dtype=torch.float32):
        self.root, self.rank, self.shard_bytes, self.latent_dtype = root, rank, shard_bytes, latent_dtype
        for sub in ("shards", "manifest", "failures"):
            os.makedirs(os.path.join(root, sub), exist_ok=True)
        own = glob.glob(os.path.join(root, "manifest", f"r{rank:05d}-*.jsonl"))
        self._next = 1 + max((int(re.findall(r"-(\d+)\.jsonl$", p)[0]) for p in own), default=-1)
        self._tensors: dict[str, torch.Tensor] = {}
        self._rows: list[dict] = []
        self._bytes = 0
        self.done = finished_items(root)

    def write_meta(self, latent_channels: int, text_dim: int, prompts: dict[str, str], pairs: bool = False) -> None:
        meta = {
            "format": FORMAT,
            "version": 1,
            "latent_channels": latent_channels,
            "text_dim": text_dim,
            "prompts": prompts,
            **({"pairs": True} if pairs else {}),
        }
        _atomic_json(os.path.join(self.root, META), meta, self.rank)

    def write_text_embeddings(self, embeddings: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """{"null": (y [L, Ct], mask [L]), "negative": ...} -> text_null.safetensors."""
        tensors = {}
        for name, (y, mask) in embeddings.items():
            tensors[f"{name}.y"], tensors[f"{name}.mask"] = y.contiguous(), mask.bool().contiguous()
        path = os.path.join(self.root, TEXT_NULL)
        tmp = f"{path}.r{self.rank}.tmp"
        save_file(tensors, tmp)
        os.replace(tmp, path)

    def add_item(self, item: str, samples: list[PreparedSample]) -> None:
        text_keys: dict[int, str] = {}  # clips sharing one caption tensor share its stored copy
        for s in samples:
            if s.latent.dim() != 4:
                raise ValueError(
                    f"{item}: sample {s.id} latent has shape {tuple(s.latent.shape)}, expected [C,T,H,W]"
                )
            shard = self._shard_name(self._next)
            latent = s.latent.to(self.latent_dtype).contiguous()
            self._tensors[f"{s.id}.latent"] = latent
            text = text_keys.setdefault(id(s.y), s.id)
            if text == s.id:
                self._tensors[f"{s.id}.y"] = s.y.contiguous()
                self._tensors[f"{s.id}.mask"] = s.mask.bool().contiguous()
                self._bytes += s.y.numel() * s.y.element_size()
            self._bytes += latent.numel() * latent.element_size()
            c, t, h, w = latent.shape
            self._rows.append(
                {
                    "id": s.id,
                    "item": item,
                    "source": s.source,
                    "task": s.task,
                    "shape": [t, h, w],
                    "channels": c,
                    "fps": float(s.fps),
                    "num_frames": s.num_frames,
                    "height": s.height,
                    "width": s.width,
                    "caption_len": int(s.mask.sum()),
                    "caption": s.caption,
                    "file": f"shards/{shard}.safetensors",
                    "keys": {"latent": f"{s.id}.latent", "y": f"{text}.y", "mask": f"{text}.mask"},
                    **s.extra,
                }
            )
        self.done.add(item)
        if self._bytes >= self.shard_bytes:
            self.flush()

    def record_failure(self, item: str, reason: str, detail: str = "") -> None:
        path = os.path.join(self.root, "failures", f"r{self.rank:05d}.jsonl")
        with open(path, "a") as f:
            f.write(json.dumps({"item": item, "reason": reason, "detail": detail[:500]}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.done.add(item)

    def flush(self) -> None:
        if not self._rows:
            return
        name = self._shard_name(self._next)
        shard = os.path.join(self.root, "shards", f"{name}.safetensors")
        save_file(self._tensors, shard + ".tmp")
        os.replace(shard + ".tmp", shard)
        part = os.path.join(self.root, "manifest", f"{name}.jsonl")
        with open(part + ".tmp", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in self._rows)
            f.flush()
            os.fsync(f.fileno())
        os.replace(part + ".tmp", part)
        self._next += 1
        self._tensors, self._rows, self._bytes = {}, [], 0

    close = flush

    def _shard_name(self, n: int) -> str:
        return f"r{self.rank:05d}-{n:06d}"


def _atomic_json(path: str, obj, rank: int) -> None:
    tmp = f"{path}.r{rank}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def finished_items(root: str) -> set[str]:
    """Prep inputs already handled (written or failed), over all ranks' parts."""
    done = {row["item"] for _, _, row in _manifest_rows(root)}
    done.update(f["item"] for f in read_failures(root))
    return done


def read_failures(root: str) -> list[dict]:
    out = []
    for path in sorted(glob.glob(os.path.join(root, "failures", "*.jsonl"))):
        with open(path) as f:
            for line in f:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut by a crash
    return out


# ---------------------------------------------------------------- reading


def _manifest_rows(root: str):
    for part in sorted(glob.glob(os.path.join(root, "manifest", "*.jsonl"))):
        with open(part) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{part}:{n}: not valid JSON ({err})") from None
                yield part, n, row


def read_meta(root: str) -> dict:
    path = os.path.join(root, META)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{root}: not a mugv dataset ({META} missing)")
    with open(path) as f:
        meta = json.load(f)
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format is {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def read_dataset_dir(root: str) -> list[SampleRecord]:
    read_meta(root)
    records = []
    for part, n, row in _manifest_rows(root):
        try:
            keys = row["keys"]
            path = os.path.join(root, row["file"])
            records.append(
                SampleRecord(
                    id=row["id"],
                    shape=tuple(int(v) for v in row["shape"]),
                    task=row["task"],
                    fps=float(row["fps"]),
                    num_frames=int(row["num_frames"]),
                    height=int(row["height"]),
                    width=int(row["width"]),
                    latent_file=path,
                    text_file=path,
                    latent_key=keys["latent"],
                    y_key=keys["y"],
                    mask_key=keys["mask"],
                    caption_len=int(row.get("caption_len", -1)),
                    item=row.get("item", ""),
                    source=row.get("source", ""),
                    caption=row.get("caption", ""),
                    channels=int(row.get("channels", 24)),
                    pair=row.get("pair", ""),
                    role=row.get("role", ""),
                )
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"{part}:{n}: bad manifest row ({type(err).__name__}: {err})") from None
    return records


def read_release_csv(path: str, default_fps: float) -> tuple[list[SampleRecord], list[tuple[str, str]]]:
    """Rows of a release training CSV; latent shapes are read from the .pt headers (memory-mapped)
    and cached next to the CSV. Returns (records, [(sample_id, error)] for unreadable rows)."""
    base = os.path.dirname(os.path.abspath(path))
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in RELEASE_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(
                f"{path}: missing column(s) {missing}; expected header {','.join(RELEASE_COLUMNS)}"
            )
        rows = list(reader)
    cache_path = path + ".mugv-shapes.json"
    cache = _load_json(cache_path)
    records, errors, dirty = [], [], False
    for row in rows:
        sid, latent = row["sample_id"], os.path.join(base, row["latent_path"])
        if row["source"] not in ("real", "generated"):
            errors.append((sid, f"source {row['source']!r} is neither 'real' nor 'generated'"))
            continue
        try:
            st = os.stat(latent)
            key = f"{row['latent_path']}|{st.st_size}|{int(st.st_mtime)}"
            if key not in cache:
                cache[key], dirty = list(load_pt_latent(latent).shape), True
            shape = cache[key]
            if len(shape) != 4:
                raise ValueError(f"latent shape {shape}, expected [C, T, H, W]")
        except Exception as err:  # noqa: BLE001 - any unreadable file is a bad row
            errors.append((sid, f"{latent}: {type(err).__name__}: {err}"))
            continue
        c, t, h, w = shape
        records.append(
            SampleRecord(
                id=sid,
                shape=(t, h, w),
                task="t2v" if t > 1 else "t2i",
                fps=default_fps,
                num_frames=8 * (t - 1) + 1,
                height=8 * h,
                width=8 * w,
                latent_file=latent,
                text_file=os.path.join(base, row["text_feat_path"]),
                source=row["source"],
                channels=c,
                release_source=row["source"],
            )
        )
    if dirty:
        try:
            write_json_atomic(cache_path, cache)
        except OSError as err:
            log.warning(f"could not cache latent shapes at {cache_path}: {err}")
    return records, errors


def _load_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return {}


def load_pt_latent(path: str) -> torch.Tensor:
    t = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"expected a tensor, found {type(t).__name__}")
    return t[0] if t.dim() == 5 and t.shape[0] == 1 else t


def read_records(path: str, default_fps: float = 24.0) -> tuple[list[SampleRecord], list[tuple[str, str]]]:
    """A dataset directory or a release CSV -> (records sorted by id, unreadable rows)."""
    if os.path.isdir(path):
        records, errors = read_dataset_dir(path), []
    elif os.path.isfile(path) and path.endswith(".csv"):
        records, errors = read_release_csv(path, default_fps)
    else:
        raise FileNotFoundError(f"{path}: neither a mugv dataset directory nor a release .csv file")
    records.sort(key=lambda r: r.id)
    return records, errors


def read_text_null(root: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Dataset-level embeddings {"null": (y, mask), "negative": ...}; {} if the dataset has none."""
    path = os.path.join(root, TEXT_NULL)
    if not os.path.isfile(path):
        return {}
    out = {}
    with safe_open(path, framework="pt") as f:
        names = {k.rsplit(".", 1)[0] for k in f.keys()}
        for n in sorted(names):
            out[n] = (f.get_tensor(f"{n}.y"), f.get_tensor(f"{n}.mask"))
    return out
