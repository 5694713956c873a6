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
        ratio = self.sum_sq_ref / self.sum_sq_err
        if not ratio > 0:  # an infinite error (0) or an unmeasured one (NaN)
            return -math.inf if ratio == 0 else math.nan
        return 10.0 * math.log10(ratio)

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


# Elements compared at a time: a chunk's temporaries stay in cache, so a large
# tensor costs no whole-size temporaries (and no page faults for them).
_CHUNK = 1 << 16


def compare(reference: np.ndarray, approx: np.ndarray) -> ErrorStats:
    """Error statistics of `approx` against `reference`.

    Each chunk's sums are taken in float32 when both are 32-bit floats or
    narrower (float64 otherwise) and added up in float64.
    """
    ref = np.asarray(reference).reshape(-1)
    app = np.asarray(approx).reshape(-1)
    if ref.shape != app.shape:
        raise ValueError(f"shape mismatch: {ref.shape} vs {app.shape}")
    narrow = all((x.dtype.kind == "f" and x.dtype.itemsize <= 4) or x.dtype.name == "bfloat16"
                 for x in (ref, app))
    work = np.float32 if narrow else np.float64
    sums = np.zeros(4, dtype=np.float64)  # ref.ref, err.err, app.app, ref.app
    max_abs = 0.0
    buffer = np.empty(min(_CHUNK, ref.size), dtype=work)
    # Non-finite values (model outputs under --allow-nonfinite weights) give NaN sums,
    # which the report shows as unmeasured; they are not a warning for the user.
    with np.errstate(invalid="ignore", over="ignore"):
        for start in range(0, ref.size, _CHUNK):
            r = ref[start:start + _CHUNK].astype(work, copy=False)
            a = app[start:start + _CHUNK].astype(work, copy=False)
            d = np.subtract(a, r, out=buffer[:r.size])
            chunk = (_dot(r, r), _dot(d, d), _dot(a, a), _dot(r, a))
            if work is np.float32 and not all(map(math.isfinite, chunk)):
                # Values near float32's limit (3.4e38) overflow its squares: redo in float64.
                r, a = r.astype(np.float64), a.astype(np.float64)
                d = a - r
                chunk = (_dot(r, r), _dot(d, d), _dot(a, a), _dot(r, a))
            sums += chunk
            np.abs(d, out=d)
            if d.size:
                max_abs = float(np.maximum(max_abs, d.max()))  # NaN stays NaN
    return ErrorStats(sum_sq_ref=float(sums[0]), sum_sq_err=float(sums[1]),
                      sum_sq_approx=float(sums[2]), dot=float(sums[3]), max_abs=max_abs,
                      count=int(ref.size))


class BlockSums:
    """The sums of ErrorStats, added up a block at a time by a kernel that has the
    decoded values of each block in hand (no second pass over a decoded copy).

    Each block's sums are taken in float32 (BLAS sdot: blocks are contiguous,
    and it is about twice as fast as einsum there) and added up in float64,
    as `compare` does.
    """

    def __init__(self) -> None:
        self.ref = self.err = self.approx = self.dot = self.max_abs = 0.0

    def add(self, ref: np.ndarray, approx: np.ndarray) -> None:
        """Add a float32 block; `approx` is overwritten with approx - ref."""
        with np.errstate(over="ignore", invalid="ignore"):
            sums = [_vdot(ref, ref), _vdot(approx, approx), _vdot(ref, approx)]
        if not all(map(math.isfinite, sums)):
            # Values near float32's limit (3.4e38) overflow its squares: work in float64.
            ref, approx = ref.astype(np.float64), approx.astype(np.float64)
            sums = [_vdot(ref, ref), _vdot(approx, approx), _vdot(ref, approx)]
        err = np.subtract(approx, ref, out=approx)
        with np.errstate(over="ignore", invalid="ignore"):
            sums.append(_vdot(err, err))
        if not math.isfinite(sums[3]):  # every difference is finite here, only its sum is not
            sums[3] = _vdot(err.astype(np.float64), err.astype(np.float64))
        self.ref += sums[0]
        self.approx += sums[1]
        self.dot += sums[2]
        self.err += sums[3]
        if err.size:
            self.max_abs = max(self.max_abs, float(err.max()), -float(err.min()))

    def stats(self, count: int) -> ErrorStats:
        """The sums as ErrorStats over `count` elements."""
        return ErrorStats(sum_sq_ref=self.ref, sum_sq_err=self.err, sum_sq_approx=self.approx,
                          dot=self.dot, max_abs=self.max_abs, count=count)


def _vdot(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.vdot(a, b))


def _dot(a: np.ndarray, b: np.ndarray) -> float:
    # einsum, not BLAS: a threaded BLAS dot costs milliseconds per call in thread
    # hand-offs on a busy machine, against microseconds for a chunk this size.
    return float(np.einsum("i,i->", a, b))


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None
