"""A streaming, mergeable histogram of one tensor's values in fixed memory.

A `Histogram` holds a tensor's values seen so far in a fixed number of bins on a
power-of-two lattice: bin k covers [k*w, (k+1)*w) with w = 2**e, so zero is
always an edge and widening the range (w doubled, pairs of bins added) loses
nothing but resolution; two histograms merge exactly on the coarser lattice.
The occupied bins always span between half and all of `bins`, so resolution
follows the data's own span, not its distance from zero.
"""

from __future__ import annotations

import math

import numpy as np

from modelpress.core.errors import InputDataError

BINS = 2048
"""Bins of a histogram unless told otherwise."""
_SLICE = 1 << 20  # values binned at once (bounds the float64 copy)
_DEPTH = 50  # the lattice never gets finer than max|x| / 2**_DEPTH (int64 bin indices)
_FLOOR_EXPONENT = -126  # the finest lattice (all-zero tensors)


class NonFiniteError(InputDataError):
    """An activation holds NaN or Inf: no range can be calibrated for it."""


class Histogram:
    """Streaming, mergeable histogram of one tensor's values in `bins` bins (fixed memory),
    with the exact min, max, count and number of exact zeros."""

    def __init__(self, bins: int = BINS, name: str = "") -> None:
        if bins < 16 or bins % 2:
            raise ValueError(f"histogram bins must be an even number >= 16, not {bins}")
        self.bins, self.name = bins, name
        self.counts = np.zeros(bins, np.int64)
        self.start = 0  # lattice index of counts[0]
        self.exponent: int | None = None  # bin width 2**exponent; None while empty
        self.count = 0
        self.zeros = 0  # values exactly 0.0 (ReLU, padding): the grid holds them exactly
        self.min, self.max = math.inf, -math.inf

    @property
    def width(self) -> float:
        """Width of one bin (0 while empty)."""
        return 0.0 if self.exponent is None else math.ldexp(1.0, self.exponent)

    def edges(self) -> np.ndarray:
        """The bins+1 edges of `counts`."""
        return (self.start + np.arange(self.bins + 1, dtype=np.float64)) * self.width

    def update(self, values: np.ndarray) -> Histogram:
        """Add `values` (any shape, floating point); raises NonFiniteError on NaN/Inf."""
        flat = np.asarray(values).reshape(-1)
        if flat.size == 0:
            return self
        lo, hi = float(flat.min()), float(flat.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            label = f"activation {self.name!r}" if self.name else "an activation"
            raise NonFiniteError(f"{label} holds NaN or Inf values on the calibration inputs; "
                                 "no int8 range fits it (fix the inputs, or keep it in float)")
        self._cover(min(lo, self.min), max(hi, self.max))
        scale = math.ldexp(1.0, -self.exponent)
        for begin in range(0, flat.size, _SLICE):
            part = flat[begin:begin + _SLICE].astype(np.float64)
            self.zeros += int(np.count_nonzero(part == 0))
            index = np.floor(part * scale).astype(np.int64) - self.start
            np.clip(index, 0, self.bins - 1, out=index)  # x == max lands on its own edge
            self.counts += np.bincount(index, minlength=self.bins)
        self.count += flat.size
        self.min, self.max = min(lo, self.min), max(hi, self.max)
        return self

    def merge(self, other: Histogram) -> Histogram:
        """Add another histogram's values (same number of bins) to this one."""
        if other.bins != self.bins:
            raise ValueError(f"cannot merge histograms of {self.bins} and {other.bins} bins")
        if other.exponent is None:
            return self
        lo, hi = min(self.min, other.min), max(self.max, other.max)
        self._cover(lo, hi, other.exponent)
        counts = _relattice(other.counts, other.start, other.exponent, self.start,
                            self.exponent, self.bins)
        self.counts += counts
        self.count += other.count
        self.zeros += other.zeros
        self.min, self.max = lo, hi
        return self

    def _cover(self, lo: float, hi: float, exponent: int | None = None) -> None:
        """Move to a lattice (at least `exponent`) and window holding [lo, hi]."""
        e = _start_exponent(lo, hi, self.bins) if self.exponent is None else self.exponent
        e = max(e, _FLOOR_EXPONENT, math.frexp(max(abs(lo), abs(hi)))[1] - _DEPTH,
                e if exponent is None else exponent)
        while _index(hi, e) - _index(lo, e) + 1 > self.bins:
            e += 1
        first = _index(lo, e)
        if self.exponent is not None and e == self.exponent and self.start <= first \
                and _index(hi, e) < self.start + self.bins:
            return
        if self.exponent is not None:
            self.counts = _relattice(self.counts, self.start, self.exponent, first, e, self.bins)
        self.start, self.exponent = first, e

    def absmax(self) -> float:
        """Largest |value| seen."""
        return max(abs(self.min), abs(self.max)) if self.count else 0.0

    def __repr__(self) -> str:
        return (f"Histogram({self.name!r}, count={self.count}, min={self.min:g}, "
                f"max={self.max:g}, bins={self.bins}, width={self.width:g})")


def _index(x: float, e: int) -> int:
    return math.floor(math.ldexp(x, -e))


def _start_exponent(lo: float, hi: float, bins: int) -> int:
    span = hi - lo
    if span <= 0:
        return _FLOOR_EXPONENT
    return math.frexp(span / bins)[1] - 1


def _relattice(counts: np.ndarray, start: int, e: int, new_start: int, new_e: int,
               bins: int) -> np.ndarray:
    """Counts on lattice e from index `start`, on the coarser lattice new_e from `new_start`."""
    index = (start + np.arange(counts.size, dtype=np.int64)) >> (new_e - e)
    used = counts > 0
    out = np.zeros(bins, np.int64)
    np.add.at(out, index[used] - new_start, counts[used])
    return out
