"""Limits a compress run must meet (for CI gates), and checking a report against them."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

from modelpress.core.evaluate import Evaluation
from modelpress.core.metrics import ErrorStats


class Measured(Protocol):
    """What `check` reads of a run: a `modelpress.core.report.Report`."""

    rows: list[Any]
    evaluation: Evaluation | None
    file_bytes_before: int
    file_bytes_after: int

    @property
    def weight_error(self) -> ErrorStats:
        """Error over all changed tensors together."""


@dataclass(frozen=True)
class Thresholds:
    """Each limit is None when not set.

    max_error: model-level relative L2 weight error (all changed tensors).
    max_output_error: the worst output's relative L2 error (ONNX, evaluated).
    min_accuracy: accuracy after compression, a fraction in [0, 1] (needs labels).
    min_ratio: input file bytes / output file bytes, i.e. how many times smaller.
    """

    max_error: float | None = None
    max_output_error: float | None = None
    min_accuracy: float | None = None
    min_ratio: float | None = None

    @property
    def needs_evaluation(self) -> bool:
        """True when a limit can only be checked by running the models."""
        return self.max_output_error is not None or self.min_accuracy is not None

    def as_dict(self) -> dict[str, float | None]:
        return {"max_error": self.max_error, "max_output_error": self.max_output_error,
                "min_accuracy": self.min_accuracy, "min_ratio": self.min_ratio}


@dataclass(frozen=True)
class ThresholdResult:
    """One limit, what was measured, and whether it held."""

    option: str
    limit: float
    measured: float | None
    passed: bool
    message: str

    def as_dict(self) -> dict[str, Any]:
        measured = self.measured
        if measured is not None and not math.isfinite(measured):
            measured = None
        return {"option": self.option, "limit": self.limit, "measured": measured,
                "passed": self.passed, "message": self.message}


def check(thresholds: Thresholds, report: Measured) -> list[ThresholdResult]:
    """The outcome of every limit that is set, in option order."""
    results = []
    if thresholds.max_error is not None:
        error = report.weight_error.rel_l2 if report.rows else 0.0
        results.append(_at_most("--max-error", thresholds.max_error, error,
                                "model weight error"))
    if thresholds.max_output_error is not None:
        evaluation = report.evaluation
        worst = evaluation.worst if evaluation is not None else None
        if worst is None:
            results.append(_unmeasured("--max-output-error", thresholds.max_output_error,
                                       "output error", report))
        else:
            results.append(_at_most("--max-output-error", thresholds.max_output_error,
                                    worst.error.rel_l2, f"worst output error ({worst.name!r})"))
    if thresholds.min_accuracy is not None:
        accuracy = report.evaluation.accuracy if report.evaluation is not None else None
        if accuracy is None:
            results.append(_unmeasured("--min-accuracy", thresholds.min_accuracy, "accuracy",
                                       report))
        else:
            results.append(_at_least("--min-accuracy", thresholds.min_accuracy, accuracy.after,
                                     "accuracy after compression", percent=True))
    if thresholds.min_ratio is not None:
        factor = (report.file_bytes_before / report.file_bytes_after
                  if report.file_bytes_after else math.inf)
        results.append(_at_least("--min-ratio", thresholds.min_ratio, factor,
                                 f"size reduction ({report.file_bytes_before} -> "
                                 f"{report.file_bytes_after} bytes)", suffix="x"))
    return results


def _at_most(option: str, limit: float, measured: float, what: str) -> ThresholdResult:
    passed = not math.isnan(measured) and measured <= limit
    relation = "<=" if passed else ">"
    return ThresholdResult(option, limit, measured, passed,
                           f"{option} {limit:g}: {what} {measured:.4g} {relation} {limit:g}")


def _at_least(option: str, limit: float, measured: float, what: str, *, percent: bool = False,
              suffix: str = "") -> ThresholdResult:
    passed = not math.isnan(measured) and measured >= limit
    relation = ">=" if passed else "<"
    if percent:
        shown, bound = f"{100 * measured:.2f}%", f"{100 * limit:.2f}%"
    else:
        shown, bound = f"{measured:.3f}{suffix}", f"{limit:g}{suffix}"
    return ThresholdResult(option, limit, measured, passed,
                           f"{option} {limit:g}: {what} {shown} {relation} {bound}")


def _unmeasured(option: str, limit: float, what: str, report: Measured) -> ThresholdResult:
    notes = report.evaluation.notes if report.evaluation is not None else []
    reason = "; ".join(n.removeprefix("output error not measured: ") for n in notes)
    return ThresholdResult(option, limit, None, False,
                           f"{option} {limit:g}: {what} was not measured"
                           + (f" ({reason})" if reason else ""))
