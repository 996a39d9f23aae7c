"""`mugv curate sample`: a stratified subset of the kept clips, e.g. for a curriculum stage.

Strata are the combinations of the `by` columns of clips.parquet: text columns (bucket, video)
by value, numeric ones (motion, sharpness, aesthetic, ...) by `bins` quantile bins of the kept
clips. The n clips are shared out as evenly as the strata allow (a stratum smaller than its
share gives all it has and the rest goes to the others), and drawn at random (seeded) within
each stratum.
"""

from __future__ import annotations

import os

import numpy as np

from mugv.config.loader import ConfigError


def read_kept(output: str) -> list[dict]:
    import pyarrow.parquet as pq

    path = os.path.join(output, "clips.parquet")
    if not os.path.isfile(path):
        raise ConfigError(f"{output}: no clips.parquet (run `mugv curate run` first)")
    return [r for r in pq.read_table(path).to_pylist() if r["keep"]]


def strata(rows: list[dict], by: list[str], bins: int) -> list[tuple]:
    """The stratum key of each row."""
    if not rows:
        return []
    missing = [c for c in by if c not in rows[0]]
    if missing:
        raise ConfigError(f"sample --by {missing[0]!r}: no such column (have {', '.join(rows[0])})")
    labels = []
    for col in by:
        values = [r[col] for r in rows]
        if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
            edges = np.quantile(np.asarray(values, dtype=np.float64), np.linspace(0, 1, bins + 1))
            idx = np.searchsorted(edges[1:-1], values, side="right")
            labels.append([f"{col}:{edges[i]:.4g}-{edges[i + 1]:.4g}" for i in idx])
        else:
            labels.append([f"{col}:{v}" for v in values])
    return list(zip(*labels))


def allocate(sizes: dict[tuple, int], n: int) -> dict[tuple, int]:
    """Even shares of n over the strata, capped by their sizes (water-filling)."""
    take, left = {}, n
    order = sorted(sizes, key=lambda k: (sizes[k], k))
    for i, key in enumerate(order):
        share = left // (len(order) - i)
        take[key] = min(sizes[key], share)
        left -= take[key]
    for key in sorted(sizes, key=lambda k: (-sizes[k], k)):  # the remainder, one each
        if left == 0:
            break
        if take[key] < sizes[key]:
            take[key] += 1
            left -= 1
    return take


def stratified_sample(rows: list[dict], by: list[str], n: int, bins: int = 3, seed: int = 0):
    """-> (chosen rows in table order, {stratum: (size, taken)})."""
    if n < 1 or bins < 1:
        raise ConfigError(f"sample: n = {n} and bins = {bins} must be >= 1")
    keys = strata(rows, by, bins)
    members: dict[tuple, list[int]] = {}
    for i, k in enumerate(keys):
        members.setdefault(k, []).append(i)
    take = allocate({k: len(v) for k, v in members.items()}, n)
    rng = np.random.default_rng(seed)
    chosen = []
    for k in sorted(members):
        chosen += [members[k][j] for j in rng.choice(len(members[k]), take[k], replace=False)]
    return [rows[i] for i in sorted(chosen)], {k: (len(members[k]), take[k]) for k in sorted(members)}
