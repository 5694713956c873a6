"""The result of a compress run: one row per changed tensor and the totals."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from modelpress import __version__
from modelpress.core.evaluate import Evaluation
from modelpress.core.metrics import EMPTY, ErrorStats
from modelpress.core.thresholds import ThresholdResult, Thresholds


@dataclass
class TensorRow:
    """One changed tensor: its encoding, bytes before and after, and weight error."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    encoding: str
    bytes_before: int
    bytes_after: int
    error: ErrorStats
    # Each stage applied to this tensor, its options resolved (Stage.resolved_config).
    stages: list[dict[str, Any]] | None = None

    @property
    def ratio(self) -> float:
        return self.bytes_after / self.bytes_before if self.bytes_before else 1.0

    def as_dict(self) -> dict[str, Any]:
        row = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype,
               "encoding": self.encoding, "bytes_before": self.bytes_before,
               "bytes_after": self.bytes_after, "ratio": self.ratio, **self.error.as_dict()}
        if self.stages is not None:
            row["stages"] = self.stages
        return row


@dataclass
class Report:
    """Everything a compress run measured; sizes are bytes on disk."""

    input_path: str
    output_path: str
    format: str
    recipe: dict[str, Any]
    rows: list[TensorRow] = field(default_factory=list)
    file_bytes_before: int = 0
    file_bytes_after: int = 0
    notes: list[str] = field(default_factory=list)
    evaluation: Evaluation | None = None
    limits: Thresholds | None = None
    checks: list[ThresholdResult] = field(default_factory=list)
    versions: dict[str, str | None] = field(default_factory=dict)
    input_sha256: str | None = None
    output_sha256: str | None = None
    # The recipe as applied: each option resolved, or by tensor where tensors differ.
    applied: dict[str, Any] | None = None
    # A --target-size/--target-error search's outcome (modelpress.app.budget.Outcome.as_dict).
    budget: dict[str, Any] | None = None
    # quantize --activations int8: the keep-float search, and onnxruntime's integer and float
    # kernels (modelpress.app.static_int8).
    static_int8: dict[str, Any] | None = None

    @property
    def failed_checks(self) -> list[ThresholdResult]:
        """The thresholds that did not hold."""
        return [c for c in self.checks if not c.passed]

    @property
    def ratio(self) -> float:
        """Output file size over input file size."""
        return self.file_bytes_after / self.file_bytes_before if self.file_bytes_before else 1.0

    @property
    def weight_error(self) -> ErrorStats:
        """Error over all changed tensors together (weighted by their energy)."""
        total = EMPTY
        for row in self.rows:
            total = total + row.error
        return total

    def as_dict(self) -> dict[str, Any]:
        """Every number of the table, JSON-safe."""
        return {
            "tool": {"name": "modelpress", "version": __version__},
            "input": self.input_path, "output": self.output_path, "format": self.format,
            "recipe": self.recipe,
            "recipe_applied": self.applied if self.applied is not None else self.recipe,
            "tensors": [row.as_dict() for row in self.rows],
            "totals": {"file_bytes_before": self.file_bytes_before,
                       "file_bytes_after": self.file_bytes_after, "ratio": self.ratio,
                       "tensor_bytes_before": sum(r.bytes_before for r in self.rows),
                       "tensor_bytes_after": sum(r.bytes_after for r in self.rows),
                       **self.weight_error.as_dict()},
            "notes": list(self.notes),
            "evaluation": None if self.evaluation is None else self.evaluation.as_dict(),
            "thresholds": {"limits": None if self.limits is None else self.limits.as_dict(),
                           "checks": [c.as_dict() for c in self.checks],
                           "passed": not self.failed_checks},
            "versions": dict(self.versions),
            "input_sha256": self.input_sha256, "output_sha256": self.output_sha256,
            **({} if self.budget is None else {"budget": self.budget}),
            **({} if self.static_int8 is None else {"static_int8": self.static_int8}),
        }


@dataclass
class InspectRow:
    """One tensor of a model as `inspect` shows it."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    stored_bytes: int
    encoding: str
    zero_fraction: float | None
    weight_like: bool

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype,
                "stored_bytes": self.stored_bytes, "encoding": self.encoding,
                "zero_fraction": self.zero_fraction, "weight_like": self.weight_like}


@dataclass
class InspectReport:
    """All tensors of a model file."""

    path: str
    format: str
    file_bytes: int
    rows: list[InspectRow] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"path": self.path, "format": self.format, "file_bytes": self.file_bytes,
                "tensors": [r.as_dict() for r in self.rows]}
