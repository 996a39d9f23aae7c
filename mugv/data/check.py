"""`check_dataset`: validate a dataset's manifest against its files without loading all tensors.

Every row: files exist, shard headers parse, the keys are present with the manifest's shapes and
float/bool dtypes, pixel size / frame count agree with the latent shape, ids are unique, tasks
are known. A pairs dataset (dataset.json "pairs": true, or rows with a pair role): every pair has
one chosen and one rejected clip of one bucket, task and caption (mugv.data.pairs). Every row's
tensors are loaded and checked for finite values and float dtypes (or, for a quick look, a
deterministic sample of value_samples rows). Release CSVs get the same checks through their .pt files.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from dataclasses import dataclass, field

from safetensors import safe_open

from mugv.data.buckets import num_tokens
from mugv.data.config import TASKS
from mugv.data.pairs import pair_problems
from mugv.data.reader import TensorReader
from mugv.data.store import SampleRecord, read_meta, read_records, read_text_null

_FLOAT = {"F32", "F16", "BF16", "F64"}


@dataclass
class CheckReport:
    path: str
    samples: int = 0
    problems: list[str] = field(default_factory=list)
    buckets: Counter = field(default_factory=Counter)
    tasks: Counter = field(default_factory=Counter)
    values_checked: int = 0
    pairs: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    def format(self, max_problems: int = 50) -> str:
        lines = [
            f"{self.path}: {self.samples} samples, {len(self.buckets)} buckets, "
            f"values checked on {self.values_checked}"
        ]
        for b, n in sorted(self.buckets.items()):
            t, h, w = (int(v) for v in b.split("x"))
            lines.append(f"  bucket {b:>12s} ({8 * h}x{8 * w} px, {num_tokens(t, h, w)} tokens): {n}")
        lines.append("  tasks: " + ", ".join(f"{k} {v}" for k, v in sorted(self.tasks.items())))
        if self.pairs:
            lines.append(f"  preference pairs: {self.pairs}")
        if self.ok:
            lines.append("OK")
        else:
            lines.append(f"{len(self.problems)} problem(s):")
            lines += [f"  {p}" for p in self.problems[:max_problems]]
            if len(self.problems) > max_problems:
                lines.append(f"  ... and {len(self.problems) - max_problems} more")
        return "\n".join(lines)


def _check_row_meta(rec: SampleRecord) -> list[str]:
    out = []
    t, h, w = rec.shape
    if rec.task not in TASKS:
        out.append(f"task {rec.task!r} not in {TASKS}")
    if (rec.height, rec.width) != (8 * h, 8 * w):
        out.append(f"pixel size {rec.height}x{rec.width} != 8 x latent {h}x{w}")
    if rec.height % 16 or rec.width % 16:
        out.append(f"pixel size {rec.height}x{rec.width} is not a multiple of 16")
    if rec.num_frames != 8 * (t - 1) + 1:
        out.append(
            f"num_frames {rec.num_frames} does not give {t} latent frames (expected {8 * (t - 1) + 1})"
        )
    if not rec.fps > 0:
        out.append(f"fps {rec.fps} is not positive")
    return out


def _check_headers(rec: SampleRecord, handle) -> list[str]:
    out, keys = [], set(handle.keys())
    expect = {rec.latent_key: [rec.channels, *rec.shape], rec.y_key: None, rec.mask_key: None}
    for key, shape in expect.items():
        if key not in keys:
            out.append(f"key {key!r} missing from {rec.latent_file}")
            continue
        sl = handle.get_slice(key)
        if shape is not None and list(sl.get_shape()) != shape:
            out.append(f"{key}: shape {sl.get_shape()} != manifest {shape}")
        if key == rec.mask_key and sl.get_dtype() != "BOOL":
            out.append(f"{key}: dtype {sl.get_dtype()}, expected BOOL")
        if key != rec.mask_key and sl.get_dtype() not in _FLOAT:
            out.append(f"{key}: dtype {sl.get_dtype()}, expected a float type")
    if not out:
        y, m = handle.get_slice(rec.y_key).get_shape(), handle.get_slice(rec.mask_key).get_shape()
        if len(y) != 2 or m != y[:1]:
            out.append(f"text y {y} / mask {m} do not match ([L, Ct] and [L])")
        elif rec.caption_len >= 0 and y[0] != rec.caption_len:
            out.append(f"text has {y[0]} tokens, manifest caption_len {rec.caption_len}")
    return out


def check_dataset(path: str, value_samples: int = -1, seed: int = 0) -> CheckReport:
    report = CheckReport(path)
    try:
        records, index_errors = read_records(path)
        if os.path.isdir(path):
            meta = read_meta(path)
            emb = read_text_null(path)
            if "null" not in emb:
                report.problems.append("dataset-level null text embedding missing (text_null.safetensors)")
    except (OSError, ValueError) as err:
        report.problems.append(str(err))
        return report
    report.samples = len(records) + len(index_errors)
    if any(r.role for r in records) or (os.path.isdir(path) and meta.get("pairs")):
        pairs, problems = pair_problems(records)
        report.pairs = len(pairs)
        report.problems += problems
        if os.path.isdir(path) and not meta.get("pairs"):
            report.problems.append("rows have pair roles but dataset.json does not say \"pairs\": true")
    report.problems += [f"{sid}: {why}" for sid, why in index_errors]
    for sid, n in Counter(r.id for r in records).items():
        if n > 1:
            report.problems.append(f"{sid}: id appears {n} times")
    by_file: dict[str, list[SampleRecord]] = {}
    for rec in records:
        report.buckets[rec.bucket] += 1
        report.tasks[rec.task] += 1
        report.problems += [f"{rec.id}: {p}" for p in _check_row_meta(rec)]
        if os.path.isdir(path) and rec.channels != meta.get("latent_channels", rec.channels):
            report.problems.append(
                f"{rec.id}: {rec.channels} latent channels, dataset.json says {meta['latent_channels']}"
            )
        by_file.setdefault(rec.latent_file, []).append(rec)
    bad_ids = set()
    for file, recs in by_file.items():
        if not os.path.isfile(file):
            report.problems.append(f"{file}: missing ({len(recs)} sample(s), e.g. {recs[0].id})")
            bad_ids.update(r.id for r in recs)
            continue
        if not recs[0].latent_key:  # release .pt pair: shapes were read at index time
            if not os.path.isfile(recs[0].text_file):
                report.problems.append(f"{recs[0].id}: text file {recs[0].text_file} missing")
                bad_ids.add(recs[0].id)
            continue
        try:
            with safe_open(file, framework="pt") as handle:
                for rec in recs:
                    probs = _check_headers(rec, handle)
                    report.problems += [f"{rec.id}: {p}" for p in probs]
                    if probs:
                        bad_ids.add(rec.id)
        except Exception as err:  # noqa: BLE001 - an unreadable shard is a finding, not a crash
            report.problems.append(f"{file}: unreadable ({type(err).__name__}: {err})")
            bad_ids.update(r.id for r in recs)
    candidates = [r for r in records if r.id not in bad_ids]
    reader = TensorReader(open_files=4)
    n_values = len(candidates) if value_samples < 0 else min(value_samples, len(candidates))
    for rec in random.Random(seed).sample(candidates, n_values):
        try:
            latent, y, _ = reader.load(rec, normalize=False)  # (raises on a non-float latent or text)
            if not latent.isfinite().all():
                report.problems.append(f"{rec.id}: latent has non-finite values")
            if not y.isfinite().all():
                report.problems.append(f"{rec.id}: text features have non-finite values")
        except Exception as err:  # noqa: BLE001
            report.problems.append(f"{rec.id}: cannot load ({type(err).__name__}: {err})")
        report.values_checked += 1
    return report
