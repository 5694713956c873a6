"""Which activations static int8 leaves in float, and each one's range method, chosen by
measured output error.

Every step is a real measurement: a QDQ model built with the choice so far,
run in onnxruntime on the calibration inputs, its worst output's relative
error against the original's. The search:

1. quantizes every activation with the default range method; done if the
   error meets the target;
2. ranks the activations by how much the error drops when that one alone is
   left float (leave-one-out: softmax inputs, norm outputs, attention scores
   and outlier activations come first);
3. for the top RANGE_TRIALS of them, tries each other range method and keeps
   the one with the least error;
4. puts activations back to float in rank order, keeping each only if the
   error drops, until the target holds or none is left.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

RANGE_TRIALS = 8
"""Activations whose range method is chosen by measurement (the most sensitive ones)."""

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
    runs: int = 0
    steps: list[tuple[str, float]] = field(default_factory=list)

    @property
    def met(self) -> bool:
        return self.error <= self.target

    def as_dict(self) -> dict[str, Any]:
        return {"target_error": self.target, "error_all_int8": self.start_error,
                "error": self.error, "met": self.met, "kept_float": list(self.keep),
                "range_methods": dict(self.methods), "measurements": self.runs}


def choose(groups: Sequence[str], candidates: Mapping[str, Sequence[str]], default: str,
           measure: Measure, target: float,
           progress: Callable[[int], None] | None = None) -> Choice:
    """Search as the module says; `candidates` lists each group's range methods."""
    methods = {g: default if default in candidates[g] else candidates[g][0] for g in groups}
    runs = [0]

    def run(keep: frozenset[str], chosen: Mapping[str, str]) -> float:
        runs[0] += 1
        if progress is not None:
            progress(1)
        return measure(keep, chosen)

    error = run(frozenset(), methods)
    choice = Choice([], methods, error, error, target)
    if error <= target:
        choice.runs = runs[0]
        return choice
    gains = {g: error - run(frozenset([g]), methods) for g in groups}
    ranked = sorted(groups, key=lambda g: -gains[g])
    for g in ranked[:RANGE_TRIALS]:
        for method in candidates[g]:
            if method == methods[g]:
                continue
            tried = {**methods, g: method}
            found = run(frozenset(), tried)
            choice.steps.append((f"range {g} {method}", found))
            if found < choice.error:
                methods, choice.error = tried, found
        if choice.error <= target:
            break
    choice.methods = methods
    for g in ranked:
        if choice.error <= target or gains[g] <= 0:
            break
        found = run(frozenset(choice.keep + [g]), methods)
        choice.steps.append((f"float {g}", found))
        if found < choice.error:
            choice.keep.append(g)
            choice.error = found
    choice.runs = runs[0]
    return choice
