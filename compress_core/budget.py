"""Budgeted compression: choose each tensor's precision to meet a size or error target.

The search (modelpress.app.budget) gives every tensor a list of options (a
candidate encoding, its exact stored bytes and its estimated contribution to
the squared output error) and asks this module for the best allocation:

- `allocate_size`: the least total error whose bytes fit a budget;
- `allocate_error`: the fewest bytes whose total error fits a budget.

Squared output errors of different tensors are treated as additive (their
errors are independent, so their effects on an output add in power). Both
allocations walk the same path: every tensor starts at its smallest option
and moves up its lower convex hull (bytes vs error), the step that removes the
most error per byte first - the Lagrangian solution for each multiplier, in
order. A size budget then fills the bytes left over with the best single
upgrades that still fit; an error budget gives back bytes with the largest
downgrades that keep the error within it. Bytes are integers, so a size budget
is met exactly or under.
"""

from __future__ import annotations

import heapq
import itertools
import math
from dataclasses import dataclass
from typing import Iterator, Mapping, Sequence

from modelpress.core.errors import ModelpressError


class BudgetError(ModelpressError):
    """A size or error target that no allocation of the candidates meets."""


@dataclass(frozen=True)
class SizeTarget:
    """A file size to stay within: bytes, or a fraction (0, 1] of the input file."""

    nbytes: int | None = None
    fraction: float | None = None

    def __post_init__(self) -> None:
        if (self.nbytes is None) == (self.fraction is None):
            raise ValueError("give one of nbytes and fraction")
        if self.nbytes is not None and self.nbytes <= 0:
            raise ValueError(f"a size target must be more than 0 bytes, got {self.nbytes}")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise ValueError(f"a fraction of the input must be in (0, 1], got {self.fraction}")

    def resolve(self, input_bytes: int) -> int:
        """The target in bytes for an input of `input_bytes`."""
        if self.nbytes is not None:
            return self.nbytes
        return int(self.fraction * input_bytes)

    def describe(self) -> str:
        if self.nbytes is not None:
            return f"{self.nbytes} bytes"
        return f"{100 * self.fraction:g}% of the input"


@dataclass(frozen=True)
class Target:
    """What a budgeted run must meet: a file size, a worst output error, or both."""

    size: SizeTarget | None = None
    error: float | None = None

    def __post_init__(self) -> None:
        if self.size is None and self.error is None:
            raise ValueError("give a size target, an error target or both")
        if self.error is not None and not self.error > 0:
            raise ValueError(f"an error target must be more than 0, got {self.error}")


@dataclass(frozen=True)
class Option:
    """One way to store one tensor: its label (int4, fp16, kept), exact stored bytes and
    estimated squared relative output error."""

    label: str
    nbytes: int
    err2: float


Allocation = list[int]
"""An index into each tensor's options."""


def totals(options: Sequence[Sequence[Option]], chosen: Allocation) -> tuple[int, float]:
    """(bytes, estimated squared error) of an allocation."""
    return (sum(opts[i].nbytes for opts, i in zip(options, chosen)),
            sum(opts[i].err2 for opts, i in zip(options, chosen)))


def smallest(options: Sequence[Sequence[Option]]) -> Allocation:
    """Each tensor's smallest option (the least error among equally small ones)."""
    return [min(range(len(opts)), key=lambda i: (opts[i].nbytes, opts[i].err2, i))
            for opts in options]


def hull(opts: Sequence[Option]) -> list[int]:
    """Indices of the lower convex hull of (bytes, error), from the smallest option up:
    each step costs more bytes and removes less error per byte than the one before."""
    order = sorted(range(len(opts)), key=lambda i: (opts[i].nbytes, opts[i].err2, i))
    points: list[int] = []
    for i in order:
        if points and opts[i].err2 >= opts[points[-1]].err2:
            continue  # more bytes for no less error
        while len(points) >= 2 and _slope(opts, points[-2], points[-1]) <= _slope(
                opts, points[-1], i):
            points.pop()  # the middle point lies above the line: never worth stopping at
        points.append(i)
    return points


def _slope(opts: Sequence[Option], a: int, b: int) -> float:
    """Error removed per byte added from option a to option b."""
    added = opts[b].nbytes - opts[a].nbytes
    removed = opts[a].err2 - opts[b].err2
    return removed / added if added > 0 else float("inf")


def _path(options: Sequence[Sequence[Option]]) -> Iterator[tuple[int, int]]:
    """The hull steps of every tensor, most error removed per byte first: (tensor, the
    option it moves to). Each tensor's steps come in its hull's order."""
    hulls = [hull(opts) for opts in options]
    heap = [(-_slope(options[t], h[0], h[1]), t, 1) for t, h in enumerate(hulls) if len(h) > 1]
    heapq.heapify(heap)
    while heap:
        _, t, step = heapq.heappop(heap)
        yield t, hulls[t][step]
        if step + 1 < len(hulls[t]):
            h = hulls[t]
            heapq.heappush(heap, (-_slope(options[t], h[step], h[step + 1]), t, step + 1))


def allocate_size(options: Sequence[Sequence[Option]], budget: int) -> Allocation | None:
    """The allocation of least estimated error whose bytes are at most `budget`, or None
    when even the smallest options exceed it."""
    chosen = smallest(options)
    used, _ = totals(options, chosen)
    if used > budget:
        return None
    blocked: set[int] = set()
    for t, new in _path(options):
        if t in blocked:
            continue
        added = options[t][new].nbytes - options[t][chosen[t]].nbytes
        if used + added > budget:
            blocked.add(t)  # this tensor's later steps cost more still
            continue
        used += added
        chosen[t] = new
    return _improve(options, chosen, budget - used, spend=True)


def _improve(options: Sequence[Sequence[Option]], chosen: Allocation, room: float,
             spend: bool) -> Allocation:
    """Single changes, the best first, while `room` lasts. spend: add bytes (room: bytes)
    for the most error removed; else give back the most bytes for error added (room: the
    error budget's slack)."""
    while True:
        best = None
        for t, opts in enumerate(options):
            now = opts[chosen[t]]
            for i, opt in enumerate(opts):
                if spend:
                    worth, cost = now.err2 - opt.err2, opt.nbytes - now.nbytes
                else:
                    worth, cost = now.nbytes - opt.nbytes, opt.err2 - now.err2
                if worth > 0 and cost <= room and (best is None or worth > best[0]):
                    best = (worth, t, i, cost)
        if best is None:
            return chosen
        _, t, i, cost = best
        chosen[t] = i
        room -= cost


def allocate_error(options: Sequence[Sequence[Option]], err2_budget: float) -> Allocation:
    """The allocation of fewest bytes whose estimated squared error is at most
    `err2_budget`; the least-error allocation when none is within it."""
    chosen = smallest(options)
    _, err2 = totals(options, chosen)
    for t, new in _path(options):
        if err2 <= err2_budget:
            break
        err2 += options[t][new].err2 - options[t][chosen[t]].err2
        chosen[t] = new
    if err2 > err2_budget:
        return [min(range(len(opts)), key=lambda i: (opts[i].err2, opts[i].nbytes, i))
                for opts in options]
    return _improve(options, chosen, err2_budget - err2, spend=False)


# Labels an allocation may use at most, beside the unrestricted one, when each label costs
# bytes of its own (see `with_label_costs`), and the labels whose subsets are tried: beyond
# that many, those the unrestricted allocation uses most.
MAX_LABELS = 3
MAX_SUBSET_LABELS = 8


def label_cost(options: Sequence[Sequence[Option]], chosen: Allocation,
               costs: Mapping[str, int]) -> int:
    """The bytes the labels an allocation uses cost once each."""
    return sum(costs.get(label, 0) for label in {opts[i].label for opts, i in
                                                  zip(options, chosen)})


def with_label_costs(options: Sequence[Sequence[Option]], costs: Mapping[str, int],
                     size: int | None = None, err2: float | None = None) -> Allocation | None:
    """`allocate_size(size)` or `allocate_error(err2)` when each label used costs bytes of
    its own once (`costs`; in ONNX, the decode function each quantized layout adds):
    the best over the unrestricted allocation and those restricted to each set of at most
    MAX_LABELS labels that cost bytes. A size budget then holds for tensor and label bytes
    together; an error budget's allocation has the fewest of both."""
    costly = sorted({o.label for row in options for o in row if costs.get(o.label, 0) > 0})
    if len(costly) > MAX_SUBSET_LABELS:  # the subsets of those the unrestricted choice uses
        free = _fixed_point(options, costs, size) if size is not None else \
            allocate_error(options, err2)
        used: dict[str, int] = {}
        for opts, i in zip(options, free or []):
            used[opts[i].label] = used.get(opts[i].label, 0) + 1
        costly = sorted(label for label in costly if label in used)
        costly = sorted(costly, key=lambda label: -used[label])[:MAX_SUBSET_LABELS]
    sets: list[set[str] | None] = [None] + [
        set(c) for k in range(1, MAX_LABELS + 1) for c in itertools.combinations(costly, k)]
    best, best_key = None, None
    for allowed in sets:
        table = options if allowed is None else _restricted(options, allowed, costs)
        chosen = _fixed_point(table, costs, size) if size is not None else \
            allocate_error(table, err2)
        if chosen is None:
            continue
        used, error = totals(options, chosen)
        if error == math.inf:
            continue
        total = used + label_cost(options, chosen, costs)
        key = (error, total) if size is not None else (error > err2, total, error)
        if best_key is None or key < best_key:
            best, best_key = chosen, key
    return best


def _restricted(options: Sequence[Sequence[Option]], allowed: set[str],
                costs: Mapping[str, int]) -> list[list[Option]]:
    """`options` where labels that cost bytes and are not `allowed` cannot be chosen."""
    return [[o if o.label in allowed or not costs.get(o.label, 0)
             else Option(o.label, _NEVER, math.inf) for o in row] for row in options]


def _fixed_point(options: Sequence[Sequence[Option]], costs: Mapping[str, int],
                 budget: int) -> Allocation | None:
    """allocate_size with the labels' own bytes taken from the budget: charge the labels
    the last allocation used until the charge stops growing."""
    charged = 0
    for _ in range(4):
        chosen = allocate_size(options, budget - charged)
        if chosen is None:
            return None
        needed = label_cost(options, chosen, costs)
        if needed <= charged:
            return chosen
        charged = needed
    chosen = allocate_size(options, budget - charged)
    if chosen is None or label_cost(options, chosen, costs) > charged:
        return None
    return chosen


_NEVER = 1 << 62  # bytes of an option that must not be chosen
