"""What the sampler would feed each data-parallel rank, without training (`mugv data plan`).

    sampler = make_sampler(buckets, tasks, cfg, dp, microbatches, cost)   # packed or bucketed per cfg
    steps = draw_steps(sampler, dp, microbatches, n)   # [step][rank][micro-batch] -> [(record, task)]
    report = summarize(steps, sampler, bucket_of, cfg.token_budget, cost)

balance: per step, the mean rank's model FLOPs over the slowest rank's (1 = every rank reaches the
gradient reduction together), averaged over steps; fill: a micro-batch's tokens over the token
budget; shares: the task and bucket mix drawn, against the one the config asks for (the
samplers' per-epoch targets; I2V by data.mix.task_weights, native I2V records aside).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from mugv.data.buckets import num_tokens
from mugv.data.config import DataConfig
from mugv.data.packed_sampler import PackedBatchSampler
from mugv.data.sampler import BucketBatchSampler, MixedSampler

Step = list[list[list[tuple[int, str]]]]  # [rank][micro-batch] -> (record index, task) per sample


def parse_synthetic(text: str) -> dict[str, int]:
    """'14x90x160=6000,1x90x160=800' -> {bucket: count}."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, count = part.partition("=")
        dims = name.split("x")
        if not sep or len(dims) != 3 or not all(d.isdigit() and int(d) > 0 for d in dims) or not count.isdigit():
            raise ValueError(f"--synthetic: {part!r} is not BUCKET=COUNT with a latent bucket TxHxW (e.g. 14x90x160=6000)")
        out[name] = out.get(name, 0) + int(count)
    if not out:
        raise ValueError("--synthetic: no BUCKET=COUNT given")
    return out


def synthetic_records(counts: dict[str, int]) -> tuple[list[str], list[str], list[str]]:
    """(bucket, task, id) per record of a dataset that does not exist yet: T = 1 are images (t2i)."""
    buckets, tasks, ids = [], [], []
    for name, n in counts.items():
        for i in range(n):
            buckets.append(name)
            tasks.append("t2i" if name.startswith("1x") else "t2v")
            ids.append(f"{name}/{i}")
    return buckets, tasks, ids


def make_sampler(buckets, tasks, cfg: DataConfig, dp: int, microbatches: int, cost) -> MixedSampler:
    if cfg.packing:
        return PackedBatchSampler(buckets, tasks, cfg, 0, dp, microbatches, cost)
    return BucketBatchSampler(buckets, tasks, cfg, 0, dp)


def draw_steps(sampler: MixedSampler, dp: int, microbatches: int, steps: int) -> list[Step]:
    out = []
    if isinstance(sampler, PackedBatchSampler):
        state = sampler.start
        for _ in range(steps):
            plan, state = sampler.plan(state, dp)
            out.append([[[sampler.sample(it.q)[:2] for it in b.items] for b in bins] for bins in plan.ranks])
        return out
    for s in range(steps):  # rank r takes stream micro-batches r, r + dp, ... (mugv.data.sampler)
        step = []
        for r in range(dp):
            reqs = [sampler.request((s * microbatches + k) * dp + r) for k in range(microbatches)]
            step.append([list(zip(q.indices, q.tasks, strict=True)) for q in reqs])
        out.append(step)
    return out


@dataclass
class Report:
    balance: float  # mean over steps of mean-rank / max-rank FLOPs
    worst_balance: float
    fill: float  # mean tokens / budget of a micro-batch
    min_fill: float
    max_fill: float
    over_budget: int  # micro-batches above the budget
    samples_per_step: float
    bucket_shares: dict[str, tuple[float, float]]  # drawn, configured
    task_shares: dict[str, tuple[float, float]]

    @property
    def share_error(self) -> float:
        """Largest |drawn - configured| share, in points."""
        pairs = [*self.bucket_shares.values(), *self.task_shares.values()]
        return 100 * max(abs(a - b) for a, b in pairs)

    def format(self) -> str:
        lines = [
            f"balance (mean rank / slowest rank model FLOPs, mean over steps): {self.balance:.4f} "
            f"(worst step {self.worst_balance:.4f})",
            f"token fill of a micro-batch: mean {self.fill:.4f}, min {self.min_fill:.4f}, max {self.max_fill:.4f}; "
            f"above the budget: {self.over_budget}",
            f"samples per step: {self.samples_per_step:.1f}",
            f"largest share error: {self.share_error:.2f} points",
            "  bucket          drawn  configured",
        ]
        lines += [f"  {k:>12s}  {100 * a:6.2f}%  {100 * b:6.2f}%" for k, (a, b) in self.bucket_shares.items()]
        lines.append("  task            drawn  configured")
        lines += [f"  {k:>12s}  {100 * a:6.2f}%  {100 * b:6.2f}%" for k, (a, b) in self.task_shares.items()]
        return "\n".join(lines)


def configured_shares(sampler: MixedSampler) -> tuple[dict[str, float], dict[str, float]]:
    total = sum(sampler.targets)
    buckets = {b.name: n / total for b, n in zip(sampler.buckets, sampler.targets, strict=True)}
    images = sum(n for b, n in zip(sampler.buckets, sampler.targets, strict=True) if b.is_image) / total
    p = sampler._i2v_probability()
    return buckets, {"t2i": images, "t2v": (1 - images) * (1 - p), "i2v": (1 - images) * p}


def summarize(steps: list[Step], sampler: MixedSampler, bucket_of: list[str], budget: int,
              cost: Callable[[int, int, int], float]) -> Report:
    shape = {b.name: tuple(int(v) for v in b.name.split("x")) for b in sampler.buckets}
    balances, fills = [], []
    buckets, tasks = Counter(), Counter()
    for step in steps:
        rank_cost = []
        for mbs in step:
            rank_cost.append(sum(cost(*shape[bucket_of[i]]) for mb in mbs for i, _ in mb))
            for mb in mbs:
                fills.append(sum(num_tokens(*shape[bucket_of[i]]) for i, _ in mb) / budget)
                buckets.update(bucket_of[i] for i, _ in mb)
                tasks.update(t for _, t in mb)
        balances.append(sum(rank_cost) / len(rank_cost) / max(rank_cost))
    n = sum(buckets.values())
    want_b, want_t = configured_shares(sampler)
    return Report(
        balance=sum(balances) / len(balances), worst_balance=min(balances),
        fill=sum(fills) / len(fills), min_fill=min(fills), max_fill=max(fills),
        over_budget=sum(f > 1 for f in fills), samples_per_step=n / len(steps),
        bucket_shares={k: (buckets[k] / n, v) for k, v in want_b.items()},
        task_shares={k: (tasks[k] / n, v) for k, v in want_t.items()},
    )


def plan_json(steps: list[Step], ids: list[str], bucket_of: list[str]) -> list:
    """[step][rank][micro-batch] -> [{"id", "shape": [T, H, W]}] (latent units)."""
    shape = lambda i: [int(v) for v in bucket_of[i].split("x")]
    return [[[[{"id": ids[i], "shape": shape(i)} for i, _ in mb] for mb in mbs] for mbs in step] for step in steps]
