"""Error metrics between an original tensor and its decoded approximation."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class ErrorStats:
    """Sums from which every metric follows; they add up over tensors."""

    sum_sq_ref: float
    sum_sq_err: float
    sum_sq_approx: float
    dot: float
    max_abs: float
    count: int

    def __add__(self, other: ErrorStats) -> ErrorStats:
        return ErrorStats(self.sum_sq_ref + other.sum_sq_ref, self.sum_sq_err + other.sum_sq_err,
                          self.sum_sq_approx + other.sum_sq_approx, self.dot + other.dot,
                          max(self.max_abs, other.max_abs), self.count + other.count)

    @property
    def rel_l2(self) -> float:
        """||approx - ref|| / ||ref||; 0 when both are zero."""
        if self.sum_sq_ref == 0:
            return 0.0 if self.sum_sq_err == 0 else math.inf
        return math.sqrt(self.sum_sq_err / self.sum_sq_ref)

    @property
    def sqnr_db(self) -> float:
        """Signal-to-quantization-noise ratio in dB (inf when exact)."""
        if self.sum_sq_err == 0:
            return math.inf
        if self.sum_sq_ref == 0:
            return -math.inf
        return 10.0 * math.log10(self.sum_sq_ref / self.sum_sq_err)

    @property
    def cosine(self) -> float:
        """Cosine similarity of the flattened tensors (1 when both are zero)."""
        den = math.sqrt(self.sum_sq_ref * self.sum_sq_approx)
        if den == 0:
            return 1.0 if self.sum_sq_ref == self.sum_sq_approx else 0.0
        return self.dot / den

    def as_dict(self) -> dict[str, float | None]:
        """The four metrics, JSON-safe (infinities become None)."""
        return {k: _finite(v) for k, v in (("rel_error", self.rel_l2), ("sqnr_db", self.sqnr_db),
                                           ("max_abs_error", self.max_abs), ("cosine", self.cosine))}


EMPTY = ErrorStats(0.0, 0.0, 0.0, 0.0, 0.0, 0)


def compare(reference: np.ndarray, approx: np.ndarray) -> ErrorStats:
    """Error statistics of `approx` against `reference` (accumulated in float64)."""
    ref = np.asarray(reference, dtype=np.float64).reshape(-1)
    app = np.asarray(approx).astype(np.float64).reshape(-1)   # always a copy: written below
    if ref.shape != app.shape:
        raise ValueError(f"shape mismatch: {ref.shape} vs {app.shape}")
    # Non-finite values (model outputs under --allow-nonfinite weights) give NaN sums,
    # which the report shows as unmeasured; they are not a warning for the user.
    with np.errstate(invalid="ignore", over="ignore"):
        sum_sq_ref, sum_sq_approx, dot = float(ref @ ref), float(app @ app), float(ref @ app)
        diff = np.subtract(app, ref, out=app)   # into the copy: one less pass over memory
        max_abs = float(np.maximum(diff.max(), -diff.min())) if diff.size else 0.0
        return ErrorStats(sum_sq_ref=sum_sq_ref, sum_sq_err=float(diff @ diff),
                          sum_sq_approx=sum_sq_approx, dot=dot, max_abs=max_abs,
                          count=int(ref.size))


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None
