"""Rounding that knows the layer's inputs: cancel the mean effect of a weight's error.

A linear layer y = x W (W is K x N, x has K inputs) quantized to W + D gets
the output error x D. Over the inputs it sees, its expected square per output
n is (mu . D[:, n])^2 + sum_k var_k D[k, n]^2 when the inputs are treated as
independent (mu, var: each input's mean and variance). Rounding to nearest
minimises only the second term. The first one is the error's mean, the same
for every input, and it dominates where the inputs are non-negative and vary
little around their mean: features after ReLU and global average pooling,
which feed the classifier of most convolutional networks. There, a few
codes rounded the other way cancel it at a small cost in the second term.

`compensate` chooses those codes per output channel: of the codes whose
other rounding neighbour moves mu . D[:, n] towards zero, in order of added
variance term per unit of mean removed, the count that minimises the sum of
both terms (zero when nothing helps: the result is never worse under this
model). It changes only codes, never scales or zero points, so the stored
form and its size do not change. The statistics come from calibration inputs
run through the original model (modelpress.formats.onnx.calibrate).
"""

from __future__ import annotations

import numpy as np

from modelpress.core.encoded import Quantized
from modelpress.core.tensorinfo import InputStats

__all__ = ["InputStats", "compensate"]


def compensate(q: Quantized, w: np.ndarray, stats: InputStats, input_axis: int) -> Quantized:
    """`q` (a quantization of the 2-D weight `w`) with codes re-rounded so that the
    mean output error under `stats` is cancelled where that lowers the expected
    squared output error. `input_axis` is the axis of `w` that the inputs multiply."""
    if w.ndim != 2 or stats.mean.shape != (w.shape[input_axis],):
        return q
    k, n = w.shape[input_axis], w.shape[1 - input_axis]
    # Work in [K, N] (inputs along axis 0, output channels along axis 1), a slab of
    # channels at a time so that the temporaries stay small (CHUNK_ELEMENTS).
    wk = np.moveaxis(np.asarray(w), input_axis, 0)
    codes = np.moveaxis(q.codes, input_axis, 0)
    scale = np.moveaxis(np.broadcast_to(q.expand(q.scale.astype(np.float32)), w.shape),
                        input_axis, 0)
    zero = None if q.zero_point is None else np.moveaxis(
        np.broadcast_to(q.expand(q.zero_point.astype(np.float32)), w.shape), input_axis, 0)
    mean = stats.mean.astype(np.float32)[:, None]
    var = np.maximum(stats.var, 0).astype(np.float32)[:, None]
    limit = min(k, CANDIDATES_BASE + CANDIDATES_PER_ROOT * int(np.sqrt(k)))
    lo, hi = -(1 << (q.bits - 1)), (1 << (q.bits - 1)) - 1
    new = None
    step = max(1, CHUNK_ELEMENTS // max(k, 1))
    for first in range(0, n, step):
        cols = slice(first, first + step)
        flips = _flips(wk[:, cols].astype(np.float32), codes[:, cols], scale[:, cols],
                       None if zero is None else zero[:, cols], mean, var, limit, lo, hi)
        if flips is None:
            continue
        if new is None:
            new = codes.copy()
        new[:, cols] += flips
    if new is None:
        return q
    return q.with_codes(np.ascontiguousarray(np.moveaxis(new, 0, input_axis)))


CHUNK_ELEMENTS = 1 << 20
"""Weight elements re-rounded at a time."""

CANDIDATES_BASE, CANDIDATES_PER_ROOT = 64, 4
"""Codes considered per channel: the cheapest BASE + PER_ROOT * sqrt(K) of those that help
(cancelling a mean takes about sqrt(K) flips; the rest are never reached)."""


def _flips(w: np.ndarray, codes: np.ndarray, scale: np.ndarray, zero: np.ndarray | None,
           mean: np.ndarray, var: np.ndarray, limit: int, lo: int, hi: int) -> np.ndarray | None:
    """Code changes (-1, 0, +1; int8) for a [K, n] slab of channels, or None if none."""
    centred = codes.astype(np.float32)
    if zero is not None:
        centred -= zero
    error = centred * scale - w                                   # D
    total = (mean * error).sum(axis=0)                            # mu . D per channel
    with np.errstate(divide="ignore", invalid="ignore"):
        steps = np.where(scale > 0, error / scale, 0)             # (w' - w) in grid steps
    # The other neighbour is one code away, against the error's sign.
    direction = -np.sign(steps).astype(np.int8)
    moved = codes.astype(np.int16) + direction
    # A flip moves mu . D by mean * direction * scale, and adds (1 - 2|steps|) scale^2
    # to D^2 (at most scale^2; never below 0 for codes in range).
    gain = -(mean * direction * scale) * np.sign(total)[None, :]  # > 0: towards zero
    useful = (direction != 0) & (moved >= lo) & (moved <= hi) & (gain > 0)
    if not useful.any():
        return None
    added = var * np.maximum(1 - 2 * np.abs(steps), 0) * scale * scale
    with np.errstate(divide="ignore", invalid="ignore"):
        cost_per_gain = np.where(useful, added / gain, np.inf)
    if limit < cost_per_gain.shape[0]:
        best = np.argpartition(cost_per_gain, limit - 1, axis=0)[:limit]
    else:
        best = np.broadcast_to(np.arange(cost_per_gain.shape[0])[:, None], cost_per_gain.shape)
    order = np.take_along_axis(best, np.argsort(
        np.take_along_axis(cost_per_gain, best, axis=0), axis=0, kind="stable"), axis=0)
    ok = np.take_along_axis(useful, order, axis=0)
    gains = np.cumsum(np.where(ok, np.take_along_axis(gain, order, axis=0), 0), axis=0,
                      dtype=np.float64)
    costs = np.cumsum(np.where(ok, np.take_along_axis(added, order, axis=0), 0), axis=0,
                      dtype=np.float64)
    remaining = np.abs(total).astype(np.float64)[None, :]
    objective = np.concatenate([remaining ** 2, (remaining - gains) ** 2 + costs], axis=0)
    count = np.argmin(objective, axis=0)                          # flips per channel
    if not count.any():
        return None
    chosen = (np.arange(order.shape[0])[:, None] < count[None, :]) & ok
    flips = np.zeros(codes.shape, dtype=np.int8)
    np.put_along_axis(flips, order, np.where(chosen, np.take_along_axis(direction, order, 0), 0),
                      axis=0)
    return flips
