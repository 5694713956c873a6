"""Calibrated grid choice: each group's scale code and zero point picked by the layer's
error after GPTQ rounding, not by the weights' own error.

The quantize stage's data-free fit (`coded`) picks a group's scale and zero
point from the group's values alone. Under calibration the error that counts
is the layer's, tr(D H D^T), after GPTQ has rounded every column with error
feedback, and that error is not the rounding error of the group alone:
GPTQ pushes later weights past the range a clipped grid covers, and how far
depends on H. As GPTQ's and AWQ's clip searches do, the grid is therefore
chosen by what it gives: for one group at a time, every candidate (the
fitted scale code moved by each of STEPS grid steps, with each zero point
the stored width allows) is rounded by GPTQ and coordinate descent over the
whole layer, and each output row keeps the candidate with the least
error of its own. Under one H the rows are independent (GPTQ feeds errors
back within a row), so a row's choice is exact for it given its other
groups, and every candidate of one group is rounded in one batched run
(rows stacked). SWEEPS passes over the groups.

The candidates stay on the tensor's stored grid (the same log-grid tables,
code width and zero-point width), so the layout and the bytes are exactly
the data-free fit's. Each candidate set holds the fitted choice first, and a
row changes only where another candidate is strictly better, so the layer's
calibration error never rises. The search runs where it fits MAX_WORK
(candidate x row x column x column updates over all groups and sweeps): the
embedding tables and heads of small models, not large layers (those keep
the fitted grid); only for grids stored as scale codes (`ScaleCode`) in
groups along a 2-D weight, unpruned, under one H (under H (x) G the rows are
coupled and a candidate would cost a per-weight GPTQ run: `regridded` moves
those grids with the codes kept instead). Where H couples no
two groups (one-hot inputs: H diagonal), GPTQ is rounding to nearest and the
grid stays the data-free fit: scoring each group under its inputs'
frequencies fitted the few calibration samples (magika's byte table, 16
calibration strings: budgeted error targets met on them were missed on
others, 0.011 for E = 0.01 and 0.114 for E = 0.1).

Measured on the sample transformer at 4 bits (output error when only that
tensor is quantized by gptq, evaluation inputs): token table 0.0266 -> 0.0243,
position table 0.0173 -> 0.0150, LM head 0.0191 -> 0.0170; choosing by the
group's own H-block error after rounding to nearest, or with the Schur
complement of H^-1 as its metric, moved them by under 2%.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from modelpress.core.quantize.optq import damped, descended, rounded
from modelpress.core.quantized import Quantized
from modelpress.core.scalecode import ScaleCode, decode_codes

STEPS = (-4, -3, -2, -1, 1, 2)
"""Scale-code steps from the fitted code tried per group (negative: coarser scales)."""
SWEEPS = 2
"""Passes over the groups."""
SEARCH_PASSES = 1
"""Sweeps of coordinate descent after GPTQ within the search (`optq.descended`)."""
MAX_WORK = 1 << 30
"""Largest search: candidates x rows x columns^2 x groups x sweeps (the sample
transformer's 512 x 64 token table at 4 bits: 2^28.8)."""


def searched_grid(fitted: Quantized, w: np.ndarray, hessian: np.ndarray) -> Quantized:
    """`fitted` (a quantization of the 2-D `w`) with each group's scale code and zero point
    re-chosen by the error GPTQ then leaves under `hessian` [K, K] (K the weight's block
    axis); `fitted` itself where the search does not apply or is over MAX_WORK."""
    code = fitted.scale_code
    if (not isinstance(code, ScaleCode) or fitted.granularity != "group" or w.ndim != 2
            or fitted.block_span != 1 or hessian.ndim != 2):
        return fitted
    axis, size = fitted.block_axis, fitted.group_size
    k = w.shape[axis]
    if hessian.shape != (k, k) or code.codes.shape != fitted.scale.shape:
        return fitted
    codes = np.moveaxis(code.codes, axis, -1).astype(np.int64)                     # [R, groups]
    # A ragged last group is padded with zero weights of zero energy: they round to
    # the zero point (exactly 0) and weigh nothing.
    pad = codes.shape[1] * size - k
    values = np.pad(np.moveaxis(np.asarray(w, np.float32), axis, -1), ((0, 0), (0, pad)))
    hessian = np.pad(hessian, ((0, pad), (0, pad)))
    k += pad
    zero = (None if fitted.zero_point is None
            else np.moveaxis(fitted.zero_point, axis, -1).astype(np.float32))
    candidates = _candidates(fitted)
    rows, groups = codes.shape
    if (not _couples_groups(hessian, size)
            or len(candidates) * rows * k * k * groups * SWEEPS > MAX_WORK):
        return fitted
    search = _Search(values, hessian, code, fitted.bits, size, len(candidates))
    for _ in range(SWEEPS):
        for group in range(groups):
            codes, zero = search.best(codes, zero, group, candidates)
    chosen = code.with_codes(np.ascontiguousarray(np.moveaxis(codes, -1, axis)).astype(np.uint8))
    return replace(fitted, scale=chosen.decode(), scale_code=chosen,
                   zero_point=None if zero is None else
                   np.ascontiguousarray(np.moveaxis(zero, -1, axis)).astype(np.int8))


def _candidates(q: Quantized) -> list[tuple[int, float | None]]:
    """(code step, zero point or None: keep the row's) per candidate; the fitted choice first."""
    if q.zero_point is None:
        return [(0, None)] + [(step, None) for step in STEPS]
    half = 1 << (min(q.zero_bits or q.bits, q.bits) - 1)
    zeros = [float(z) for z in range(-half, half)]
    return [(0, None)] + [(step, z) for step in (0,) + STEPS for z in zeros]


def _couples_groups(hessian: np.ndarray, size: int) -> bool:
    """Whether H couples any two groups (not so for one-hot inputs: H diagonal)."""
    groups = hessian.shape[0] // size
    h = np.abs(np.asarray(hessian, np.float64)).reshape(groups, size, groups, size)
    inside = np.einsum("gigj->", h)
    return bool(h.sum() - inside > 1e-9 * inside)


class _Search:
    """The rows of one layer, tiled once per candidate, rounded by GPTQ under one H."""

    def __init__(self, values: np.ndarray, hessian: np.ndarray, code: ScaleCode, bits: int,
                 size: int, count: int) -> None:
        self.rows = values.shape[0]
        self.tiled = np.tile(values, (count, 1))[None]
        self.h = np.asarray(hessian, np.float32)[None]
        self.damped = damped(self.h)
        self.metric = np.asarray(hessian, np.float64)
        self.code, self.bits, self.size = code, bits, size

    def best(self, codes: np.ndarray, zero: np.ndarray | None, group: int,
             candidates: list[tuple[int, float | None]]) -> tuple[np.ndarray, np.ndarray | None]:
        """`codes` and `zero` [R, groups] with column `group` the best candidate per row."""
        count, rows = len(candidates), self.rows
        tried = np.tile(codes, (count, 1))
        zeros = None if zero is None else np.tile(zero, (count, 1))
        top = (1 << self.code.bits) - 1
        for i, (step, z) in enumerate(candidates):
            part = slice(i * rows, (i + 1) * rows)
            tried[part, group] = np.clip(codes[:, group] + step, 0, top)
            if zeros is not None and z is not None:
                zeros[part, group] = z
        errors = self._errors(tried, zeros).reshape(count, rows)
        pick = np.argmin(errors, axis=0) * rows + np.arange(rows)  # ties: the first
        chosen = codes.copy()
        chosen[:, group] = tried[pick, group]
        if zeros is None:
            return chosen, None
        kept = zero.copy()
        kept[:, group] = zeros[pick, group]
        return chosen, kept

    def _errors(self, codes: np.ndarray, zero: np.ndarray | None) -> np.ndarray:
        """Each row's error tr(d H d^T) after GPTQ and descent on the grid (codes, zero)."""
        scale = np.repeat(decode_codes(codes, self.code.high, self.code.low, self.code.bits),
                          self.size, axis=1)[None]
        zeros = (np.zeros_like(scale) if zero is None
                 else np.repeat(zero, self.size, axis=1)[None])
        q = rounded(self.tiled, scale, zeros, None, self.h, self.bits)
        q = descended(self.tiled, scale, zeros, None, self.damped, q, self.bits, SEARCH_PASSES)
        d = ((q[0].astype(np.float64) - zeros[0]) * scale[0]) - self.tiled[0]
        return np.einsum("rk,rk->r", d @ self.metric, d)


def regridded(q: Quantized, w: np.ndarray, h: np.ndarray, g: np.ndarray) -> Quantized:
    """`q` with its codes kept and, group by group, each row's scale code and zero point
    moved to the candidate (as the search's) that lowers tr(G D H D^T) most (`h` [K, K]
    and `g` [R, R] damped, float64; R the outputs, K the block axis of the 2-D `w`); rows
    one at a time, as G couples them. `q` itself where the layout is not searched
    (see `searched_grid`). Alternated with coordinate descent over the codes, the
    layer's error falls at every step (a block coordinate descent over codes and grid)."""
    code = q.scale_code
    if (not isinstance(code, ScaleCode) or q.granularity != "group" or w.ndim != 2
            or q.block_span != 1 or code.codes.shape != q.scale.shape):
        return q
    axis, size = q.block_axis, q.group_size
    values = np.moveaxis(np.asarray(w, np.float64), axis, -1)
    rows, k = values.shape
    if h.shape != (k, k) or g.shape != (rows, rows):
        return q
    codes = np.moveaxis(q.codes, axis, -1).astype(np.float64)
    grid = np.moveaxis(code.codes, axis, -1).astype(np.int64)
    zero = (np.zeros(grid.shape) if q.zero_point is None
            else np.moveaxis(q.zero_point, axis, -1).astype(np.float64))
    scale = decode_codes(grid, code.high, code.low, code.bits).astype(np.float64)

    def spread(per_group: np.ndarray) -> np.ndarray:
        return np.repeat(per_group, size, axis=1)[:, :k]

    grad = g @ ((codes - spread(zero)) * spread(scale) - values) @ h
    steps = np.array([c[0] for c in _candidates(q)[1:]])
    zeros = np.array([np.nan if c[1] is None else c[1] for c in _candidates(q)[1:]])
    top, moved = (1 << code.bits) - 1, False
    for group in range(grid.shape[1]):
        part = slice(group * size, min((group + 1) * size, k))
        block = h[part, part]
        for r in range(rows):
            tried = np.clip(grid[r, group] + steps, 0, top)
            s = decode_codes(tried, code.high, code.low, code.bits).astype(np.float64)
            z = np.where(np.isnan(zeros), zero[r, group], zeros)
            now = (codes[r, part] - zero[r, group]) * scale[r, group]
            change = (codes[r, part][None] - z[:, None]) * s[:, None] - now[None]
            gain = 2 * change @ grad[r, part] + g[r, r] * np.einsum(
                "nm,mk,nk->n", change, block, change)
            best = int(np.argmin(gain))
            if gain[best] < 0:
                moved = True
                grid[r, group], scale[r, group], zero[r, group] = tried[best], s[best], z[best]
                grad += np.outer(g[:, r], change[best] @ h[part, :])
    if not moved:
        return q
    chosen = code.with_codes(np.ascontiguousarray(np.moveaxis(grid, -1, axis)).astype(np.uint8))
    return replace(q, scale=chosen.decode(), scale_code=chosen,
                   zero_point=None if q.zero_point is None else
                   np.ascontiguousarray(np.moveaxis(zero, -1, axis)).astype(np.int8))
