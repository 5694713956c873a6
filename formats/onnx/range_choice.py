"""Each activation's range method chosen by the output error it causes, measured.

The estimators of `modelpress.core.activation_ranges` each minimise something local
(clipped mass, KL divergence, squared error of the tensor); what matters is the
model's output. `choose` starts from the method whose ranges, used for every tensor,
give the least output error, then visits the tensors one at a time (those whose
candidate ranges disagree most first) and keeps, for each, the candidate that lowers
the output error by more than `margin` with the others fixed at their current choice
(greedy coordinate descent). Errors are the worst relative error of the outputs' signals (the logits
before a final softmax, else the outputs: `run.signals`), measured in onnxruntime on
the calibration inputs through one `FakeQuantRunner` session; `max_runs` bounds the
runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
import onnx

from modelpress.core.activation_ranges import ActivationRange
from modelpress.formats.onnx.fake_quant import FakeQuantRunner, worst_error
from modelpress.formats.onnx.run import load_inputs

MAX_RUNS = 200
"""Model runs a choice may take unless told otherwise."""
MARGIN = 0.02
"""A tensor's choice changes only when the error drops by more than this share: smaller
gains on a few calibration samples were noise (measured on open_nsfw's 4 calibration
images: without it, 9 of 54 tensors changed and the error on 8 other images rose from
0.0175 to 0.0217)."""


@dataclass
class RangeChoice:
    """The chosen range of each tensor, the signal error it gives on the calibration inputs,
    that error with every tensor on one method, and the runs taken."""

    chosen: dict[str, ActivationRange]
    error: float
    uniform: dict[str, float] = field(default_factory=dict)
    runs: int = 0
    changed: int = 0  # tensors whose choice differs from the starting method


def choose(path: Path, model: onnx.ModelProto, calibration: Path,
           candidates: Mapping[str, Mapping[str, ActivationRange]],
           max_runs: int = MAX_RUNS, margin: float = MARGIN) -> RangeChoice:
    """Per tensor of `candidates` (name -> method -> range), the method whose range gives the
    least output error on the calibration inputs (see the module's text)."""
    feeds = load_inputs(model, calibration)
    signed = {g.signed for options in candidates.values() for g in options.values()}
    if len(signed) > 1:
        raise ValueError("candidate ranges mix int8 and uint8")
    runner = FakeQuantRunner(path, model, list(candidates), feeds, signed=signed == {True},
                             calibration=calibration)
    return choose_with(runner, candidates, runner.outputs({}), max_runs, margin)


def choose_with(runner: FakeQuantRunner, candidates: Mapping[str, Mapping[str, ActivationRange]],
                reference: Mapping[str, np.ndarray], max_runs: int = MAX_RUNS,
                margin: float = MARGIN) -> RangeChoice:
    """`choose` on a runner already made; `reference`: the float model's outputs."""
    methods = list(dict.fromkeys(m for options in candidates.values() for m in options))
    budget = max_runs
    measured = list(dict.fromkeys(runner.signals.values()))

    def measure(ranges: Mapping[str, ActivationRange]) -> float:
        nonlocal budget
        budget -= 1
        error = worst_error(reference, runner.outputs(ranges), measured)
        return error if math.isfinite(error) else math.inf

    uniform = {}
    for method in methods:
        if budget <= 0:
            break
        uniform[method] = measure({n: o[method] for n, o in candidates.items() if method in o})
    start = min(uniform, key=uniform.get)
    current = {n: o.get(start) or next(iter(o.values())) for n, o in candidates.items()}
    error = uniform[start]
    changed = 0
    for name in _by_disagreement(candidates):
        for method, grid in candidates[name].items():
            if budget <= 0:
                break
            if _same(grid, current[name]):
                continue
            tried = measure({**current, name: grid})
            if tried < error * (1 - margin):
                current[name], error = grid, tried
        changed += current[name].method != start
    return RangeChoice(current, error, uniform, max_runs - budget, changed)


def _same(a: ActivationRange, b: ActivationRange) -> bool:
    return a.zero_point == b.zero_point and a.scale == b.scale


def _by_disagreement(candidates: Mapping[str, Mapping[str, ActivationRange]]) -> list[str]:
    """Tensors whose candidate ranges differ, widest spread of scales first."""
    spread = {}
    for name, options in candidates.items():
        grids = list(options.values())
        if all(_same(g, grids[0]) for g in grids):
            continue
        scales = [g.scale for g in grids]
        spread[name] = math.log(max(scales) / min(scales)) + 1e-9 * len(
            {g.zero_point for g in grids})
    return sorted(spread, key=lambda n: -spread[n])
