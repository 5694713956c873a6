"""Which activations static int8 leaves in float, and each one's range method, chosen by
measured output error.

Every step is a real measurement: a QDQ model built with the choice so far,
run in onnxruntime on the calibration inputs, its worst output's relative
error against the original's. The search:

1. quantizes every activation with each range method in turn and starts from
   the method with the least error; done if it meets the target;
2. ranks the activations by the error when that one alone is int8 (softmax
   inputs, norm outputs, attention scores and outlier activations come first);
3. for the top RANGE_TRIALS of them, tries each other range method and keeps
   the one with the least error;
4. puts activations back to float in rank order, keeping each only if the
   error drops by MIN_GAIN of itself or more, until the target holds or none
   is left.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

RANGE_TRIALS = 4
"""Activations whose range method is chosen by measurement (the most sensitive ones)."""
PUT_BACK_RUNS = 24
"""Most activations tried back in float after the ranking (bounds the search's runs)."""
MIN_GAIN = 0.1
"""Least share of the error that putting one activation back to float must remove to stay
float: each one kept float can cost an integer kernel, so small gains are not worth it."""

Measure = Callable[[frozenset[str], Mapping[str, str]], float]
"""(groups kept float, range method per group) -> worst relative output error."""


@dataclass
class Choice:
    """The outcome: groups kept float (in the order they were put back), each group's range
    method, the measured error before and after, and every measurement made."""

    keep: list[str]
    methods: dict[str, str]
    start_error: float
    error: float
    target: float
    counter: list[int] = field(default_factory=lambda: [0], repr=False)
    steps: list[tuple[str, float]] = field(default_factory=list)
    groups: list[str] = field(default_factory=list)
    ranked: list[str] = field(default_factory=list)   # most sensitive first
    position: int = 0   # how far down `ranked` put_back has gone
    measure: Measure | None = field(default=None, repr=False)

    @property
    def runs(self) -> int:
        """Model runs measured so far."""
        return self.counter[0]

    @property
    def met(self) -> bool:
        return self.error <= self.target

    def as_dict(self) -> dict[str, Any]:
        return {"target_error": self.target, "error_all_int8": self.start_error,
                "error": self.error, "met": self.met, "kept_float": list(self.keep),
                "range_methods": dict(self.methods), "measurements": self.runs}


def choose(groups: Sequence[str], candidates: Mapping[str, Sequence[str]], measure: Measure,
           target: float, progress: Callable[[int], None] | None = None) -> Choice:
    """Search as the module says; `candidates` lists each group's range methods."""
    runs = [0]

    def run(keep: frozenset[str], chosen: Mapping[str, str]) -> float:
        runs[0] += 1
        if progress is not None:
            progress(1)
        return measure(keep, chosen)

    uniform = {}
    for method in dict.fromkeys(m for g in groups for m in candidates[g]):
        tried = {g: method if method in candidates[g] else candidates[g][0] for g in groups}
        uniform[method] = (run(frozenset(), tried), tried)
    error, methods = min(uniform.values(), key=lambda found: found[0]) if uniform else (
        run(frozenset(), {}), {})
    choice = Choice([], methods, error, error, target, counter=runs, measure=run,
                    groups=list(groups))
    choice.steps += [(f"all {m}", e) for m, (e, _) in uniform.items()]
    if error <= target:
        return choice
    rank(choice)
    for g in choice.ranked[:RANGE_TRIALS]:
        for method in candidates[g]:
            if method == choice.methods[g]:
                continue
            tried = {**choice.methods, g: method}
            found = run(frozenset(), tried)
            choice.steps.append((f"range {g} {method}", found))
            if found < choice.error:
                choice.methods, choice.error = tried, found
        if choice.error <= target:
            break
    return put_back(choice, target)


def rank(choice: Choice) -> None:
    """Order the groups by the error when each alone is int8, largest first."""
    everything = frozenset(choice.groups)
    alone = {g: choice.measure(everything - {g}, choice.methods) for g in choice.groups}
    choice.ranked = sorted(choice.groups, key=lambda g: -alone[g])


def confirm(choice: Choice, measure: Measure, error: float, target: float) -> Choice:
    """Go down the ranking again with `measure` (runs of the model as written, whose int8
    kernels and float weights the simulation does not match), from the written model's
    `error`, putting activations back until `target` holds."""
    if not choice.ranked:
        rank(choice)  # by the simulation: a ranking by sessions would cost one per group
    counted = choice.measure

    def run(keep: frozenset[str], methods: Mapping[str, str]) -> float:
        choice.counter[0] += 1
        return measure(keep, methods)

    choice.measure, choice.error, choice.position = run, error, 0
    put_back(choice, target)
    choice.measure = counted
    return choice


def put_back(choice: Choice, target: float) -> Choice:
    """Put activations back to float in rank order (from where the last call stopped),
    each kept only if the error drops, until the error is at most `target`."""
    if not choice.ranked and choice.error > target:
        rank(choice)
    limit = choice.position + PUT_BACK_RUNS
    while choice.error > target and choice.position < min(len(choice.ranked), limit):
        g = choice.ranked[choice.position]
        choice.position += 1
        if g in choice.keep:
            continue
        found = choice.measure(frozenset(choice.keep + [g]), choice.methods)
        choice.steps.append((f"float {g}", found))
        if found < choice.error * (1 - MIN_GAIN):
            choice.keep.append(g)
            choice.error = found
    return choice


def float_weights(names: Sequence[str], error: float, target: float,
                  measure: Callable[[frozenset[str]], float],
                  counter: list[int]) -> tuple[frozenset[str], float]:
    """When the written model misses `target` with activations already chosen: give float
    nodes their float weights back (`names` store int8 ones; `measure` takes the set still
    int8), those whose weights alone cost the most first, each kept only if the error drops
    by MIN_GAIN of itself, until the target holds. Returns the nodes left with int8 weights
    and the error."""
    current = frozenset(names)
    alone = {}
    for name in list(names)[:PUT_BACK_RUNS]:
        counter[0] += 1
        alone[name] = measure(current - {name})
    for name in sorted(alone, key=alone.__getitem__):
        if error <= target:
            break
        found = alone[name] if len(current) == len(names) else measure(current - {name})
        counter[0] += len(current) != len(names)
        if found < error * (1 - MIN_GAIN):
            current, error = current - {name}, found
    return current, error
