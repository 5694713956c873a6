"""Activation ranges for static int8: the clip each calibration method picks from a histogram.

`ranges` turns a `Histogram` (modelpress.core.histogram) of an activation into
one `ActivationRange` (scale, zero point) per method: its min and max; a
percentile; the threshold of least KL divergence between the clipped
distribution and its quantized form, as in TensorRT's int8 calibration
(Migacz, GTC 2017); and the clip of least expected squared quantization error.
Values inside a bin are taken as spread evenly between its edges (clamped to
the exact min and max). The grid always holds 0.0 exactly (padding, ReLU).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from modelpress.core.errors import InputDataError
from modelpress.core.histogram import BINS, Histogram, NonFiniteError

PERCENTILE = 99.99
"""Share of values (percent) the percentile method keeps inside the range."""
METHODS = ("minmax", "percentile", "entropy", "mse")
_CANDIDATES = 128  # clips tried per search step
_SHRINK = 1 / 64  # the smallest clip tried, as a share of the full range


@dataclass(frozen=True)
class ActivationRange:
    """QuantizeLinear parameters of one activation: x ~ (clamp(round(x/scale) + zero_point)
    - zero_point) * scale, on uint8 (signed=False) or int8 (signed=True, zero_point 0)."""

    scale: float
    zero_point: int
    method: str
    bits: int = 8
    signed: bool = False

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) if self.signed else 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.signed else (1 << self.bits) - 1

    @property
    def bounds(self) -> tuple[float, float]:
        """The smallest and largest values the grid represents."""
        return ((self.qmin - self.zero_point) * self.scale,
                (self.qmax - self.zero_point) * self.scale)

    def fake(self, values: np.ndarray) -> np.ndarray:
        """`values` quantized and dequantized (float32, round half to even as in onnxruntime)."""
        x = np.asarray(values, np.float32)
        q = np.clip(np.rint(x / np.float32(self.scale)) + self.zero_point, self.qmin, self.qmax)
        return ((q - self.zero_point) * np.float32(self.scale)).astype(np.float32)


def range_for(lo: float, hi: float, method: str, bits: int = 8,
              symmetric: bool = False) -> ActivationRange:
    """The grid covering [lo, hi] (widened to hold 0.0, which it represents exactly)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    if symmetric:
        amax = max(-lo, hi)
        scale = float(np.float32(amax / ((1 << (bits - 1)) - 1)))
        return ActivationRange(scale if scale > 0 else 1.0, 0, method, bits, True)
    qmax = (1 << bits) - 1
    scale = float(np.float32((hi - lo) / qmax))
    if not scale > 0:
        return ActivationRange(1.0, 0, method, bits, False)
    zero_point = int(min(max(round(-lo / scale), 0), qmax))
    return ActivationRange(scale, zero_point, method, bits, False)


def ranges(hist: Histogram, bits: int = 8, symmetric: bool = False,
           percentile: float = PERCENTILE) -> dict[str, ActivationRange]:
    """One range per method of METHODS: uint8 with a zero point by default, int8 symmetric
    (zero point 0) when `symmetric`. Raises InputDataError for an empty histogram."""
    if hist.count == 0:
        label = f"activation {hist.name!r}" if hist.name else "an activation"
        raise InputDataError(f"{label} has no calibration values")
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], not {percentile}")
    if not 2 <= bits <= 16:
        raise ValueError(f"activation bits must be in 2..16, not {bits}")
    clips = {"minmax": (hist.min, hist.max),
             "percentile": percentile_clip(hist, percentile, symmetric),
             "entropy": entropy_clip(hist, bits, symmetric),
             "mse": mse_clip(hist, bits, symmetric)}
    return {name: range_for(lo, hi, name, bits, symmetric) for name, (lo, hi) in clips.items()}


def _occupied(hist: Histogram, zeros: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Edges (n+1) and counts (n) of the bins from the first to the last non-empty one,
    the outer edges clamped to the exact min and max; without the exact zeros unless
    `zeros` (the grid holds 0.0 exactly: they cost no error and tell nothing of the rest)."""
    used = np.flatnonzero(hist.counts)
    first, last = int(used[0]), int(used[-1])
    edges = (hist.start + np.arange(first, last + 2, dtype=np.float64)) * hist.width
    edges[0], edges[-1] = hist.min, hist.max
    counts = hist.counts[first:last + 1].astype(np.float64)
    if not zeros and hist.zeros:
        counts[-hist.start - first] -= hist.zeros  # the bin [0, w)
    return edges, counts


def _folded(hist: Histogram, zeros: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Edges and counts of |x| (bin k and bin -k-1 of the lattice are both |x| in bin k);
    without the exact zeros unless `zeros`."""
    k = hist.start + np.arange(hist.bins, dtype=np.int64)
    j = np.where(k >= 0, k, -k - 1)
    counts = np.bincount(j - j.min(), weights=hist.counts.astype(np.float64))
    first = int(j.min())
    if not zeros and hist.zeros:
        counts[-first] -= hist.zeros
    last = first + int(np.flatnonzero(counts)[-1])
    counts = counts[:last - first + 1]
    edges = np.arange(first, last + 2, dtype=np.float64) * hist.width
    low = hist.min if hist.min > 0 else (-hist.max if hist.max < 0 else 0.0)
    edges[0], edges[-1] = max(edges[0], low), hist.absmax()
    return edges, counts


def _quantile(edges: np.ndarray, counts: np.ndarray, q: float) -> float:
    """The value below which a share q of the counts lies (linear within a bin)."""
    cumulative = np.cumsum(counts)
    target = q * cumulative[-1]
    i = min(int(np.searchsorted(cumulative, target, side="left")), counts.size - 1)
    before = cumulative[i - 1] if i else 0.0
    inside = (target - before) / counts[i] if counts[i] else 0.0
    return float(edges[i] + min(max(inside, 0.0), 1.0) * (edges[i + 1] - edges[i]))


def percentile_clip(hist: Histogram, percentile: float = PERCENTILE,
                    symmetric: bool = False) -> tuple[float, float]:
    """[lo, hi] holding `percentile` percent of the values: the same share left out at each
    end, or (symmetric) of |x| left out above."""
    if symmetric:
        t = _quantile(*_folded(hist), percentile / 100)
        return -t, t
    tail = (1 - percentile / 100) / 2
    edges, counts = _occupied(hist)
    return _quantile(edges, counts, tail), _quantile(edges, counts, 1 - tail)


def _search(loss, lo0: float, hi0: float, symmetric: bool) -> tuple[float, float]:
    """The clip of least `loss` (list of (lo, hi) -> array): a shrink of both ends together,
    then of the upper end alone, then of the lower end alone (coordinate descent)."""
    shrink = np.geomspace(_SHRINK, 1.0, _CANDIDATES)
    lo0, hi0 = min(lo0, 0.0), max(hi0, 0.0)
    if symmetric:
        amax = max(-lo0, hi0)
        steps = [[(-a * amax, a * amax) for a in shrink]]
    else:
        steps = [[(a * lo0, a * hi0) for a in shrink]]
    best = (lo0, hi0)
    for step in range(1 if symmetric else 3):
        if step == 1:
            steps.append([(best[0], a * hi0) for a in shrink if a * hi0 >= 0])
        elif step == 2:
            steps.append([(a * lo0, best[1]) for a in shrink])
        candidates = steps[step] + [best]
        losses = loss(candidates)
        best = candidates[int(np.argmin(losses))]
    return best


def mse_clip(hist: Histogram, bits: int = 8, symmetric: bool = False) -> tuple[float, float]:
    """The clip whose grid gives the least expected squared error over the histogram."""
    if hist.max == hist.min:
        return hist.min, hist.max
    edges, counts = _occupied(hist, zeros=False)

    def loss(candidates: list[tuple[float, float]]) -> np.ndarray:
        return _mean_errors(edges, counts, [range_for(lo, hi, "mse", bits, symmetric)
                                            for lo, hi in candidates], hist.count)
    return _search(loss, hist.min, hist.max, symmetric)


def expected_error(hist: Histogram, grid: ActivationRange) -> float:
    """Mean squared error of `grid` over the histogram's values."""
    return float(_mean_errors(*_occupied(hist, zeros=False), [grid], hist.count)[0])


def _mean_errors(edges: np.ndarray, counts: np.ndarray, grids: list[ActivationRange],
                 total: float) -> np.ndarray:
    """Mean squared error of each grid over `total` values, of which `counts` spread evenly
    within each bin (the others exact zeros): the integral of the rounding error inside
    the grid's bounds and of the clipping error outside."""
    s = np.array([g.scale for g in grids])[:, None]
    bounds = np.array([g.bounds for g in grids])
    low, high = bounds[:, :1], bounds[:, 1:]
    left, right = edges[None, :-1], edges[None, 1:]

    def rounding(x: np.ndarray) -> np.ndarray:  # integral of (t - s*round(t/s))^2 from -s/2
        u = x / s + 0.5
        n = np.floor(u)
        return s ** 3 * (n / 12 + ((u - n - 0.5) ** 3 + 0.125) / 3)

    inside = rounding(np.clip(right, low, high)) - rounding(np.clip(left, low, high))
    below = ((np.minimum(right, low) - low) ** 3 - (np.minimum(left, low) - low) ** 3) / 3
    above = ((np.maximum(right, high) - high) ** 3 - (np.maximum(left, high) - high) ** 3) / 3
    width = right - left
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = np.where(width > 0, (inside + below + above) / width, 0.0)
    point = left - np.clip(np.rint(left / s), low / s, high / s) * s  # bins of zero width
    mean = np.where(width > 0, mean, point * point)
    return mean @ counts / total


def entropy_clip(hist: Histogram, bits: int = 8, symmetric: bool = False) -> tuple[float, float]:
    """The clip of least KL divergence between the histogram inside it (values outside
    added to its end bins) and that histogram merged into the grid's levels and spread back
    over its non-empty bins (TensorRT's calibration; on |x| with 2**(bits-1) levels when
    symmetric, on x with 2**bits - 1 otherwise). Exact zeros are left out: the grid holds
    them exactly, and after a ReLU their spike alone made narrow windows win (a ReLU'd
    Gaussian clipped at 2 sigma; measured on open_nsfw, logits error 0.43 against min/max's
    0.018). Falls back to min/max where the histogram is too coarse to tell (fewer bins
    than levels)."""
    if hist.max == hist.min:
        return hist.min, hist.max
    if symmetric:
        edges, counts = _folded(hist, zeros=False)
        levels, lo0, hi0 = 1 << (bits - 1), -hist.absmax(), hist.absmax()
    else:
        edges, counts = _occupied(hist, zeros=False)
        levels, lo0, hi0 = (1 << bits) - 1, hist.min, hist.max
    width = hist.width
    origin = edges[1] - width  # the lattice edge at or below edges[0]

    def window(lo: float, hi: float) -> tuple[int, int]:
        # symmetric: the window of |x| is [0, hi], nothing is clipped below
        a = 0 if symmetric else max(int(np.floor((lo - origin) / width)), 0)
        b = min(int(np.ceil((hi - origin) / width)), counts.size)
        return a, b

    def loss(candidates: list[tuple[float, float]]) -> np.ndarray:
        return np.array([_divergence(counts, *window(lo, hi), levels) for lo, hi in candidates])

    lo, hi = _search(loss, lo0, hi0, symmetric)
    if not np.isfinite(loss([(lo, hi)])[0]):
        return hist.min, hist.max
    a, b = window(lo, hi)
    low, high = origin + a * width, origin + b * width
    if symmetric:
        return -min(high, hist.absmax()), min(high, hist.absmax())
    return max(low, hist.min), min(high, hist.max)


def _divergence(counts: np.ndarray, a: int, b: int, levels: int) -> float:
    """KL(P || Q) for the window of bins [a, b) (see entropy_clip); inf when b - a < levels."""
    n = b - a
    if n < levels:
        return np.inf
    sliced = counts[a:b]
    p = sliced.copy()
    p[0] += counts[:a].sum()
    p[-1] += counts[b:].sum()
    group = (np.arange(n) * levels) // n
    nonzero = p > 0
    mass = np.bincount(group, weights=sliced, minlength=levels)
    filled = np.bincount(group, weights=nonzero, minlength=levels)
    q = np.where(nonzero, mass[group] / np.maximum(filled[group], 1), 0.0)
    if q.sum() <= 0:
        return np.inf
    p, q = p[nonzero] / p.sum(), q[nonzero] / q.sum()
    return float(np.sum(p * np.log(p / np.maximum(q, 1e-12))))


__all__ = ["ActivationRange", "BINS", "Histogram", "METHODS", "NonFiniteError", "PERCENTILE",
           "entropy_clip", "expected_error", "mse_clip", "percentile_clip", "range_for",
           "ranges"]
