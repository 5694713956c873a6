"""Comparing a model's outputs before and after compression: error, top-1, accuracy, latency.

Pure numpy: the arrays come from running both models (`modelpress.formats.onnx.run`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import numpy as np

from modelpress.core.errors import InputDataError
from modelpress.core.metrics import ErrorStats, compare

SAFETENSORS_NOTE = ("output error not measured: safetensors holds weights only, with no graph "
                    "to run; output error needs the ONNX form of the model")
LATENCY_NOTE = ("median wall time of repeated onnxruntime CPU runs on this machine, the two "
                "models run alternately; q1/q3: the interquartile range of those runs")


def shared_samples(arrays: Iterable[np.ndarray]) -> int | None:
    """The length of the first axis every array has (their samples), or None when they do
    not share one: a scalar among them, lengths that differ, or no arrays."""
    firsts = {a.shape[0] if a.ndim else None for a in arrays}
    return firsts.pop() if len(firsts) == 1 and None not in firsts else None


@dataclass(frozen=True)
class OutputError:
    """How far one output of the compressed model is from the original's."""

    name: str
    shape: tuple[int, ...]
    error: ErrorStats
    top1_agreement: float | None

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), **self.error.as_dict(),
                "top1_agreement": self.top1_agreement}


@dataclass(frozen=True)
class Accuracy:
    """Top-1 accuracy against labels, before and after, on one output."""

    output: str
    count: int
    correct_before: int
    correct_after: int

    @property
    def before(self) -> float:
        return self.correct_before / self.count

    @property
    def after(self) -> float:
        return self.correct_after / self.count

    @property
    def change_points(self) -> float:
        """After minus before, in percentage points."""
        return 100.0 * (self.after - self.before)

    def as_dict(self) -> dict[str, Any]:
        return {"output": self.output, "labels": self.count, "before": self.before,
                "after": self.after, "change_points": self.change_points}


@dataclass(frozen=True)
class Latency:
    """Median run time of each model, in milliseconds."""

    before_ms: float
    after_ms: float
    runs_before: int
    runs_after: int
    # First and third quartiles of each model's run times (the spread), when measured.
    before_iqr_ms: tuple[float, float] | None = None
    after_iqr_ms: tuple[float, float] | None = None

    @property
    def ratio(self) -> float:
        """Compressed time over original time."""
        return self.after_ms / self.before_ms if self.before_ms > 0 else math.inf

    def as_dict(self) -> dict[str, Any]:
        return {"before_ms": self.before_ms, "after_ms": self.after_ms,
                "ratio": self.ratio if math.isfinite(self.ratio) else None,
                "runs_before": self.runs_before, "runs_after": self.runs_after,
                "before_q1_ms": _quartile(self.before_iqr_ms, 0),
                "before_q3_ms": _quartile(self.before_iqr_ms, 1),
                "after_q1_ms": _quartile(self.after_iqr_ms, 0),
                "after_q3_ms": _quartile(self.after_iqr_ms, 1),
                "measured": LATENCY_NOTE}


def _quartile(iqr: tuple[float, float] | None, which: int) -> float | None:
    return None if iqr is None else _json_float(iqr[which])


@dataclass
class Evaluation:
    """Both models run on the same inputs, or why they were not.

    status: "ok"; "not-applicable" (no graph to run); "unavailable"
    (onnxruntime missing); "failed" (onnxruntime cannot run a model);
    "skipped" (--no-eval).
    """

    status: str
    runtime: str | None = None
    inputs: dict[str, Any] = field(default_factory=dict)
    outputs: list[OutputError] = field(default_factory=list)
    accuracy: Accuracy | None = None
    latency: Latency | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def worst(self) -> OutputError | None:
        """The output with the largest relative error (NaN counts as largest)."""
        if not self.outputs:
            return None
        return max(self.outputs, key=lambda o: _sortable(o.error.rel_l2))

    @property
    def output_error(self) -> float | None:
        """The worst output's relative L2 error, or None when not measured."""
        worst = self.worst
        return None if worst is None else worst.error.rel_l2

    def as_dict(self) -> dict[str, Any]:
        worst = self.worst
        return {"status": self.status, "runtime": self.runtime, "inputs": self.inputs,
                "outputs": [o.as_dict() for o in self.outputs],
                "worst_output": None if worst is None else worst.name,
                "output_error": _json_float(self.output_error),
                "accuracy": None if self.accuracy is None else self.accuracy.as_dict(),
                "latency": None if self.latency is None else self.latency.as_dict(),
                "notes": list(self.notes)}


# Name parts of outputs that hold a state or a vector, never one score per class.
_NOT_SCORES = ("state", "hidden", "embed", "pool", "feature", "encoding", "vector")
_NOT_SCORES_PARTS = {"h", "c", "hn", "cn", "h0", "c0", "hy", "cy", "kv", "past", "present"}


def looks_like_class_scores(name: str, array: np.ndarray) -> bool:
    """True for an output that holds one score per class along its last axis.

    Floats shaped [batch, classes] or [batch, positions, classes] (more than
    one class). Not a map of 4 or more dims (segmentation, detection), and not
    an output named like a recurrent state or an embedding (state, hidden, hn,
    embed, pool, feature...): their argmax means nothing, and a top-1
    agreement there reads as a failure.
    """
    if array.dtype.kind != "f" or array.ndim not in (2, 3) or array.shape[-1] < 2:
        return False
    lowered = name.lower()
    parts = set(filter(None, "".join(c if c.isalnum() else " " for c in lowered).split()))
    return not any(word in lowered for word in _NOT_SCORES) and not parts & _NOT_SCORES_PARTS


def top1_agreement(before: np.ndarray, after: np.ndarray) -> float | None:
    """Fraction of positions whose argmax over the last axis is the same (class scores only)."""
    if before.ndim == 0 or before.shape[-1] < 2 or before.dtype.kind != "f":
        return None
    same = np.argmax(before, axis=-1) == np.argmax(after, axis=-1)
    return float(np.mean(same))


def compare_outputs(before: Mapping[str, np.ndarray],
                    after: Mapping[str, np.ndarray]) -> list[OutputError]:
    """Per-output error of `after` against `before`, in `before`'s order."""
    rows = []
    for name, ref in before.items():
        got = after.get(name)
        if got is None or got.shape != ref.shape:
            shape = None if got is None else list(got.shape)
            raise ValueError(f"output {name!r}: compressed model gives {shape}, original "
                             f"{list(ref.shape)}")
        top1 = top1_agreement(ref, got) if looks_like_class_scores(name, ref) else None
        rows.append(OutputError(name, tuple(ref.shape), compare(ref, got), top1))
    return rows


def label_output(shapes: Mapping[str, tuple[int, ...]], labels: np.ndarray, source: str) -> str:
    """The first output that holds class scores for each label (shape labels.shape + [C])."""
    for name, shape in shapes.items():
        if len(shape) == labels.ndim + 1 and tuple(shape[:-1]) == labels.shape and shape[-1] > 1:
            return name
    listed = ", ".join(f"{n} {list(s)}" for n, s in shapes.items())
    raise InputDataError(f"{source}: labels of shape {list(labels.shape)} match no output of "
                         f"class scores (outputs: {listed}); give one label per sample")


def correct_count(scores: np.ndarray, labels: np.ndarray) -> int:
    """How many argmax predictions equal the labels."""
    return int(np.count_nonzero(np.argmax(scores, axis=-1) == labels))


def _sortable(value: float) -> float:
    return math.inf if math.isnan(value) else value


def _json_float(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None
