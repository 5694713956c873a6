"""The result of a batch run: one row per model, the copied files, and totals."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from modelpress import __version__

OK, FAILED, SKIPPED = "ok", "failed", "skipped"


@dataclass
class ModelResult:
    """What happened to one model: status, sizes, worst tensor error, its full report."""

    path: str                      # input main file, relative to the batch's base folder
    output: str
    kind: str                      # "onnx", "safetensors" or "sharded"
    status: str                    # ok, failed or skipped
    reason: str = ""
    bytes_before: int = 0
    bytes_after: int | None = None
    worst_error: float | None = None  # largest per-tensor relative L2 error
    tensors_changed: int = 0
    report: dict[str, Any] | None = None  # Report.as_dict() of a model compressed in this run

    @property
    def ratio(self) -> float | None:
        """Output bytes over input bytes, when both are known."""
        if self.bytes_after is None or not self.bytes_before:
            return None
        return self.bytes_after / self.bytes_before

    def as_dict(self) -> dict[str, Any]:
        """JSON-safe row."""
        worst = self.worst_error if self.worst_error is None or math.isfinite(
            self.worst_error) else None
        return {"path": self.path, "output": self.output, "kind": self.kind,
                "status": self.status, "reason": self.reason,
                "bytes_before": self.bytes_before, "bytes_after": self.bytes_after,
                "ratio": self.ratio, "worst_rel_error": worst,
                "tensors_changed": self.tensors_changed, "report": self.report}


@dataclass
class CopyResult:
    """A file copied unchanged (or left as it was, or not copied)."""

    path: str
    output: str
    status: str                    # ok, failed or skipped (already identical)
    bytes: int = 0
    reason: str = ""

    def as_dict(self) -> dict[str, Any]:
        """JSON-safe row."""
        return {"path": self.path, "output": self.output, "status": self.status,
                "bytes": self.bytes, "reason": self.reason}


@dataclass
class Refusal:
    """A path of the input tree that was refused (a link, a special file)."""

    path: str
    reason: str

    def as_dict(self) -> dict[str, Any]:
        """JSON-safe row."""
        return {"path": self.path, "status": FAILED, "reason": self.reason}


@dataclass
class BatchReport:
    """Everything a batch run did."""

    base: str
    outdir: str
    recipe: dict[str, Any]
    jobs: int
    shard: str | None = None
    models: list[ModelResult] = field(default_factory=list)
    copies: list[CopyResult] = field(default_factory=list)
    refused: list[Refusal] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        """True when any model or copy failed or any path was refused."""
        return bool(self.refused) or any(r.status == FAILED for r in [*self.models, *self.copies])

    def count(self, status: str) -> int:
        """Models with this status."""
        return sum(1 for m in self.models if m.status == status)

    @property
    def bytes_before(self) -> int:
        """Input bytes of the models that have an output (done now or earlier)."""
        return sum(m.bytes_before for m in self.models if m.bytes_after is not None)

    @property
    def bytes_after(self) -> int:
        """Output bytes of those models."""
        return sum(m.bytes_after for m in self.models if m.bytes_after is not None)

    @property
    def worst_error(self) -> float | None:
        """The largest per-tensor relative error of any model compressed in this run."""
        errors = [m.worst_error for m in self.models if m.worst_error is not None]
        return max(errors) if errors else None

    def as_dict(self) -> dict[str, Any]:
        """Every number of the summary and each model's own report, JSON-safe."""
        before, after = self.bytes_before, self.bytes_after
        worst = self.worst_error
        return {
            "tool": {"name": "modelpress", "version": __version__},
            "input": self.base, "output": self.outdir, "recipe": self.recipe,
            "jobs": self.jobs, "shard": self.shard,
            "models": [m.as_dict() for m in self.models],
            "copied": [c.as_dict() for c in self.copies],
            "refused": [r.as_dict() for r in self.refused],
            "totals": {"models": len(self.models), "ok": self.count(OK),
                       "failed": self.count(FAILED), "skipped": self.count(SKIPPED),
                       "files_copied": sum(1 for c in self.copies if c.status == OK),
                       "copy_failures": sum(1 for c in self.copies if c.status == FAILED),
                       "refused": len(self.refused),
                       "bytes_before": before, "bytes_after": after,
                       "ratio": after / before if before else None,
                       "worst_rel_error": worst if worst is None or math.isfinite(worst)
                       else None},
            "notes": list(self.notes),
        }
