"""The curation summary (kept / dropped counts per filter) and the score histograms (PNG)."""

from __future__ import annotations

import dataclasses
import os
from collections import Counter
from dataclasses import dataclass, field

from mugv.curate.config import FilterConfig
from mugv.utils.checkpoint_io import write_json_atomic

# score column -> (lower bound field, upper bound field) of FilterConfig, drawn on its histogram
BOUNDS = {
    "sharpness": ("min_sharpness", "max_sharpness"),
    "motion": ("min_motion", "max_motion"),
    "brightness": ("min_brightness", "max_brightness"),
    "black_fraction": (None, "max_black_fraction"),
    "frozen_fraction": (None, "max_frozen_fraction"),
    "border_fraction": (None, "max_border_fraction"),
    "aesthetic": ("min_aesthetic", None),
    "artifact": (None, "max_artifact"),
}


@dataclass
class Summary:
    videos: int = 0  # in the input
    curated: int = 0  # with a result (any shard)
    processed: int = 0  # by this run
    video_failures: Counter = field(default_factory=Counter)  # reason -> videos that gave no clip
    clips: int = 0
    kept: int = 0
    filters: list[dict] = field(default_factory=list)  # name, rule, failed (any), dropped (first reason)

    @classmethod
    def from_rows(cls, rows: list[dict], f: FilterConfig, videos: int, rules: dict) -> Summary:
        clips = [r for r in rows if r["clip"] >= 0]
        any_fail = Counter(name for r in clips for name in r["reasons"].split(",") if name)
        first = Counter(r["reason"] for r in clips if r["reason"])
        params = dataclasses.asdict(f)
        table = []
        for name, (_, rule) in rules.items():
            scored = name not in ("aesthetic", "artifact") or any(r[name] is not None for r in clips)
            text = rule.format(**params) if scored else "no model configured"
            table.append({"name": name, "rule": text, "failed": any_fail[name], "dropped": first[name]})
        dup = f"pHash distance <= {f.max_duplicate_distance}" if f.max_duplicate_distance >= 0 else "off"
        table.append(
            {"name": "duplicate", "rule": dup, "failed": first["duplicate"], "dropped": first["duplicate"]}
        )
        return cls(
            videos=videos,
            curated=len({r["video"] for r in rows}),
            video_failures=Counter(r["reason"] for r in rows if r["clip"] == -1),
            clips=len(clips),
            kept=sum(r["keep"] for r in clips),
            filters=table,
        )

    def format(self) -> str:
        fails = ", ".join(f"{k} {n}" for k, n in sorted(self.video_failures.items())) or "none"
        lines = [
            f"curate: {self.videos} videos ({self.curated} curated, {self.videos - self.curated} still to do, "
            f"{self.processed} by this run); {sum(self.video_failures.values())} gave no clip ({fails})",
            f"curate: {self.clips} clips: {self.kept} kept, {self.clips - self.kept} dropped",
            f"  {'filter':<11} {'rule':<38} {'failed':>6} {'dropped':>7}",
        ]
        lines += [
            f"  {t['name']:<11} {t['rule']:<38} {t['failed']:>6} {t['dropped']:>7}" for t in self.filters
        ]
        return "\n".join(lines)

    def write(self, output: str) -> None:
        d = dataclasses.asdict(self)
        d["video_failures"] = dict(self.video_failures)
        write_json_atomic(os.path.join(output, "summary.json"), d)


def write_histograms(rows: list[dict], scores: list[str], f: FilterConfig, directory: str) -> list[str]:
    """One PNG per score with values (hist/<score>.png), its thresholds drawn as lines."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    os.makedirs(directory, exist_ok=True)
    written = []
    for name in scores:
        values = [r[name] for r in rows if r["clip"] >= 0 and r[name] is not None]
        if not values:
            continue
        fig = Figure(figsize=(5, 3), dpi=80)
        FigureCanvasAgg(fig)
        ax = fig.subplots()
        ax.hist(values, bins=30, color="tab:blue")
        for bound in BOUNDS[name]:
            if bound is not None:
                ax.axvline(
                    getattr(f, bound), color="tab:red", linestyle="--", label=f"{bound} {getattr(f, bound)}"
                )
        ax.set_xlabel(name)
        ax.set_ylabel("clips")
        ax.set_title(f"{name}: {len(values)} clips")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = os.path.join(directory, f"{name}.png")
        fig.savefig(path)
        written.append(path)
    return written
