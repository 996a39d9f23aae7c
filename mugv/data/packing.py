"""Planning one training step of packed micro-batches: fill each micro-batch up to the token
budget (the memory cap) and give every data-parallel rank the same model FLOPs.

    plan = plan_step(pool, locked, ranks=W, bins=M, budget=B, max_samples=S)
    plan.ranks[r][m]   # items of rank r's micro-batch m
    plan.deferred      # items of the pool left for the next step

`pool` is a window of the shuffled sample stream: its first `locked` items waited long enough
and are placed first, whatever it costs the balance (so no item waits long, and over any window
the mix is the stream's); the rest (deferred earlier, then fresh) may wait. The pool holds more
tokens than the step can take, which is the planner's freedom:

1. deal (longest processing time first): items by cost, largest first, each to the rank with the
   least cost so far that has a micro-batch it fits (best fit: the fullest one); what fits
   nowhere is deferred;
2. even out (local search on the costliest rank, while it helps): swap one of its items with a
   cheaper one of another rank, move one to another rank, or replace one by a cheaper deferred
   items (never a locked one); every micro-batch keeps at least one sample and stays within the
   budget and max_samples.

A cost is a sample's model FLOPs (attention included: at 720p one 50k-token clip costs ~15x the
attention of 13 images with the same tokens), so ranks that finish together need the same
number of heavy clips, not the same tokens. Deterministic: ties break by stream index.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Item:
    q: int  # stream index of the sample
    tokens: int
    cost: float
    kind: int  # same-shape class (bucket index): items of one kind are interchangeable


@dataclass
class Bin:
    """One micro-batch."""

    items: list[Item] = field(default_factory=list)
    tokens: int = 0

    def fits(self, it: Item, budget: int, max_samples: int) -> bool:
        if not self.items:
            return True  # an empty micro-batch takes any one sample (even one above the budget)
        return self.tokens + it.tokens <= budget and len(self.items) < max_samples

    def add(self, it: Item) -> None:
        self.items.append(it)
        self.tokens += it.tokens

    def remove(self, it: Item) -> None:
        self.items.remove(it)
        self.tokens -= it.tokens


@dataclass
class StepPlan:
    ranks: list[list[Bin]]
    deferred: list[Item]

    @property
    def costs(self) -> list[float]:
        return [sum(it.cost for b in bins for it in b.items) for bins in self.ranks]

    @property
    def balance(self) -> float:
        """Mean rank cost / max rank cost (1 = every rank finishes together)."""
        c = self.costs
        return sum(c) / len(c) / max(c) if max(c) > 0 else 1.0


def plan_step(pool: list[Item], locked: int, ranks: int, bins: int, budget: int, max_samples: int,
              max_moves: int | None = None) -> StepPlan:
    plan = StepPlan([[Bin() for _ in range(bins)] for _ in range(ranks)], [])
    cost = [0.0] * ranks
    by_cost = lambda it: (-it.cost, -it.tokens, it.q)
    # 1. deal: locked items first, then the fresh ones, each largest first
    for it in sorted(pool[:locked], key=by_cost) + sorted(pool[locked:], key=by_cost):
        for r in sorted(range(ranks), key=lambda r: (cost[r], r)):
            b = _best_fit(plan.ranks[r], it, budget, max_samples)
            if b is not None:
                b.add(it)
                cost[r] += it.cost
                break
        else:
            plan.deferred.append(it)
    for bins_ in plan.ranks:  # a micro-batch left empty (a pool too small) takes the smallest deferred item
        for b in bins_:
            if not b.items and plan.deferred:
                it = min(plan.deferred, key=lambda it: (it.tokens, it.q))
                plan.deferred.remove(it)
                b.add(it)
    # 2. even out
    lock = {it.q for it in pool[:locked]}
    for _ in range(max_moves if max_moves is not None else 2 * ranks + 16):
        if not _improve(plan, lock, budget, max_samples):
            break
    plan.deferred.sort(key=lambda it: it.q)
    return plan


def _best_fit(bins: list[Bin], it: Item, budget: int, max_samples: int) -> Bin | None:
    best = None
    for b in bins:
        if b.fits(it, budget, max_samples) and (best is None or b.tokens > best.tokens):
            best = b
    return best


def _kinds(items, latest: bool = True) -> dict[int, Item]:
    """One representative item per kind: the latest in the stream (or the earliest)."""
    out: dict[int, Item] = {}
    for it in items:
        if it.kind not in out or (it.q > out[it.kind].q) == latest:
            out[it.kind] = it
    return out


class _Costs:
    """Rank costs, and the balance (mean / max) after changing some of them."""

    def __init__(self, plan: StepPlan):
        self.c = plan.costs
        self.total = sum(self.c)
        self.order = sorted(range(len(self.c)), key=lambda r: (-self.c[r], r))  # costliest first

    def score(self, new: dict[int, float]) -> tuple[float, int]:
        """(balance, -ranks at the max) with ranks' costs replaced by `new`: larger is better."""
        peak = max(new.values(), default=0.0)
        for r in self.order:
            if r not in new:
                peak = max(peak, self.c[r])
                break
        mean = (self.total + sum(v - self.c[r] for r, v in new.items())) / len(self.c)
        tol = 1e-9 * max(peak, 1.0)
        at_peak = sum(1 for r, v in enumerate(self.c) if new.get(r, v) >= peak - tol)
        return (round(mean / peak, 12) if peak > 0 else 1.0), -at_peak


def _improve(plan: StepPlan, lock: set[int], budget: int, max_samples: int, partners: int = 2) -> bool:
    """Apply the one change that raises the balance (mean / max rank cost) the most, or keeps it
    and lowers the number of ranks at the max; prefer the one that defers the fewest tokens.
    Changes: on the costliest rank, move or swap an item with one of the `partners` cheapest
    ranks, or replace it by cheaper deferred items; on the cheapest ranks, add deferred items or
    replace one by costlier ones; on all the ranks tied at the max at once, replace one item each
    by cheaper deferred ones. False if nothing helps."""
    costs = _Costs(plan)
    c, order = costs.c, costs.order
    r1 = order[0]
    cheapest = order[1:][::-1][: 2 * partners]
    best, best_score = None, (*costs.score({}), 0)

    def consider(new: dict[int, float], lost_tokens: int, change):
        nonlocal best, best_score
        sc = (*costs.score(new), -lost_tokens)
        if sc > best_score:
            best, best_score = change, sc

    spare = _Deferred(plan.deferred)
    for a in plan.ranks[r1]:
        alone = len(a.items) == 1
        for i in _kinds(a.items).values():
            for js in spare.replacements(a, i, lock, budget, max_samples, below=i.cost):
                consider({r1: c[r1] - i.cost + _cost(js)}, i.tokens - _tokens(js), [("defer", a, i, js)])
            for r2 in cheapest[:partners]:
                for b in plan.ranks[r2]:
                    if not alone and b.items and b.fits(i, budget, max_samples):
                        consider({r1: c[r1] - i.cost, r2: c[r2] + i.cost}, 0, [("move", a, i, b)])
                    for j in _kinds(b.items).values():
                        d = i.cost - j.cost
                        if d > 0 and (alone or j.tokens <= budget - a.tokens + i.tokens) and (
                            len(b.items) == 1 or i.tokens <= budget - b.tokens + j.tokens
                        ):
                            consider({r1: c[r1] - d, r2: c[r2] + d}, 0, [("swap", a, i, b, j)])
    for r in cheapest:
        room = c[r1] - c[r]  # what the rank may gain without becoming the costliest
        for b in plan.ranks[r]:
            js = spare.fill(b, budget, max_samples, room)
            if js:
                consider({r: c[r] + _cost(js)}, -_tokens(js), [("add", b, js)])
            for i in _kinds(b.items).values():
                for js in spare.replacements(b, i, lock, budget, max_samples, below=i.cost + room, above=i.cost):
                    consider({r: c[r] - i.cost + _cost(js)}, i.tokens - _tokens(js), [("defer", b, i, js)])
    group = _group_down(plan, costs, lock, budget, max_samples)
    if group is not None:
        consider(*group)
    if best is None:
        return False
    for change in best:
        _apply(plan, change)
    return True


def _cost(items) -> float:
    return sum(it.cost for it in items)


def _tokens(items) -> int:
    return sum(it.tokens for it in items)


class _Deferred:
    """The deferred items by kind (earliest first), for filling a micro-batch's free space."""

    def __init__(self, items: list[Item]):
        self.by_kind: dict[int, list[Item]] = {}
        for it in sorted(items, key=lambda it: it.q):
            self.by_kind.setdefault(it.kind, []).append(it)
        self.kinds = sorted(self.by_kind, key=lambda k: (-self.by_kind[k][0].cost, k))

    def fill(self, b: Bin, budget: int, max_samples: int, below: float, first: int | None = None,
             without: Item | None = None) -> list[Item]:
        """Deferred items for bin b (without item `without`), costliest first (starting with kind
        `first`), while they fit and cost less than `below` together."""
        free = budget - b.tokens + (without.tokens if without else 0)
        room = max_samples - len(b.items) + (1 if without else 0)
        empty = len(b.items) == (1 if without else 0)
        out, total = [], 0.0
        for k in ([first] if first is not None else []) + self.kinds:
            for j in self.by_kind[k]:
                if room <= 0 or (j.tokens > free and not (empty and not out)) or total + j.cost >= below or j in out:
                    break
                out.append(j)
                free, room, total = free - j.tokens, room - 1, total + j.cost
            if first is not None and not out:
                return []
        return out

    def replacements(self, b: Bin, i: Item, lock: set[int], budget: int, max_samples: int, below: float,
                     above: float = float("-inf")):
        """Ways to replace unlocked item i of bin b by deferred items costing in (above, below)
        together: one per first kind, the rest filled costliest first."""
        if i.q in lock:
            return
        for k in self.kinds:
            js = self.fill(b, budget, max_samples, below, first=k, without=i)
            if js and _cost(js) > above:
                yield js


def _group_down(plan: StepPlan, costs: _Costs, lock: set[int], budget: int, max_samples: int):
    """Every rank tied at the max replaces one item by cheaper deferred ones, each landing as
    high as it can below the max (distinct deferred items)."""
    c, peak = costs.c, costs.c[costs.order[0]]
    tied = [r for r in costs.order if c[r] >= peak - 1e-9 * max(peak, 1.0)]
    if len(tied) < 2:
        return None
    left = list(plan.deferred)
    new, lost, changes = {}, 0, []
    for r in tied:
        spare = _Deferred(left)
        options = [(c[r] - i.cost + _cost(js), a, i, js) for a in plan.ranks[r] for i in _kinds(a.items).values()
                   for js in spare.replacements(a, i, lock, budget, max_samples, below=i.cost)]
        if not options:
            return None
        cost, a, i, js = max(options, key=lambda o: (o[0], -min(j.q for j in o[3])))
        for j in js:
            left.remove(j)
        new[r], lost = cost, lost + i.tokens - _tokens(js)
        changes.append(("defer", a, i, js))
    return new, lost, changes


def _apply(plan: StepPlan, change) -> None:
    kind = change[0]
    if kind == "add":
        _, b, js = change
        for j in js:
            plan.deferred.remove(j)
            b.add(j)
    elif kind == "defer":
        _, a, i, js = change
        a.remove(i)
        for j in js:
            plan.deferred.remove(j)
            a.add(j)
        plan.deferred.append(i)
    elif kind == "move":
        _, a, i, b = change
        a.remove(i)
        b.add(i)
    else:
        _, a, i, b, j = change
        a.remove(i)
        b.remove(j)
        a.add(j)
        b.add(i)
