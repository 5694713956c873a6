"""Calibrated rounding: OPTQ/GPTQ (Frantar et al. 2022) on the quantize stage's own grid.

A layer y = x W with K inputs, quantized to W + D, gets the squared output
error sum_n D[:, n]^T H D[:, n] over the calibration rows, where
H = X^T X / rows (`tensorinfo.SecondMoments`). GPTQ rounds one input
(column of the [outputs, K] view) at a time for every output at once, and
spreads each column's rounding error over the columns not yet rounded in the
proportions that H^-1 gives (error feedback), so later roundings cancel
earlier errors along the directions the inputs take. As in the paper:

- damping: H + 1% of its mean diagonal on the diagonal (H from few rows is
  singular; an input that never varies gets a well-defined weight);
- act-order: columns in order of descending diag(H), the inputs that carry
  most energy first, while most columns are still free to absorb errors;
- the inverse through the upper Cholesky factor U of H^-1 (H^-1 = U^T U):
  column i's error divided by U[i, i] moves the later columns by U[i, j > i];
- lazy batched updates: within a block of BLOCK columns the updates are
  rank-1, and the rest of the matrix is updated once per block.

After GPTQ, up to PASSES sweeps of coordinate descent (`optq.descended`) move
single codes by one step where that lowers the layer's error under the same
damped H: GPTQ fixes each column once, from the columns before it only. On
the sample transformer's MatMul weights at 4 bits this lowered the layer
errors by a further 4-9% (the model's output error by 4%, 0.0480 -> 0.0462
with the embeddings left as they are); 4 sweeps gave no more than 2.

The grid is fitted first, by the stage's own fitter for the plan (the same
scales, scale codes, zero points, multipliers as rtn/mse would store, so
the output has exactly their layout and size); GPTQ then chooses the codes,
each clipped to the grid's range. Where the scales are log-grid codes, the
codes each group points at (and its zero point) are then chosen under
calibration too, on the same tables and widths: by the error GPTQ leaves
(`gridsearch.searched_grid`, layers under one H within its budget), or,
under H (x) G, by ROUNDS of grid moves with the codes kept, each followed
by coordinate descent (`gridsearch.regridded`). On the sample transformer
at 4 bits the moves lowered the probed layers' output errors by 1-4%. Act-order works unchanged on a
fixed grid (the paper's "static groups"). Measured on the sample
transformer's MatMul weights (layer output error on held-out inputs, 4 bits):
refitting each group's grid on the updated weights when its first column is
reached, in natural order, moved the error by -6% to +7% against this.

Conv weights use the im2col view: one [outputs per group, K] matrix and one
H per convolution group (K = input channels per group x kernel elements).
Pruned weights (a mask) stay exactly zero: their code is the zero point and
their error is fed back like any other (SparseGPT with a fixed mask).
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from modelpress.core.blas import one_blas_thread
from modelpress.core.compose import factor_info
from modelpress.core.encoded import Dense, Encoded, LowRank, Quantized, Sparse
from modelpress.core.quantize.gridsearch import regridded, searched_grid
from modelpress.core.quantize.optq import (MAX_OUTPUT_WEIGHTS, damped, descended,
                                           descended_columns, rounded, rounded_columns)
from modelpress.core.quantize.plan import QuantPlan
from modelpress.core.tensorinfo import TensorInfo


Fit = Callable[[np.ndarray, TensorInfo], Quantized]
"""The quantize stage's grid for a tensor: its plan, fitted without calibration."""
View = tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]


def rounding_notes(quantized: list[tuple[str, TensorInfo, QuantPlan]]) -> list[str]:
    """Report notes: how many of the tensors a calibrated run quantized (name, info, plan;
    those whose --method asked for gptq or was left unset) GPTQ rounded, and why not
    the others."""
    if not quantized:
        return []
    others = [(name, info, plan) for name, info, plan in quantized if plan.method != "gptq"]
    note = (f"--calibration: {len(quantized) - len(others)} of {len(quantized)} quantized "
            "tensors rounded by GPTQ")
    if others:
        name, info, plan = others[0]
        if info.role not in ("MatMul", "Gemm", "Conv", "Gather"):
            why = (f"{'used by ' + info.role if info.role else 'not a weight'}; gptq takes "
                   "MatMul, Gemm and Conv weights and Gather tables")
        elif info.input_stats is None:
            why = ("not probed: see modelpress.formats.onnx.probe" if info.role == "Gather"
                   else "no input statistics: see the notes above")
        else:
            why = "its input moments are over the size limit"
        methods = "/".join(sorted({p.method for _, _, p in others}))
        note += f"; {len(others)} by {methods} instead, e.g. {name!r} ({why})"
    return [note]


def round_calibrated(encoded: Encoded, info: TensorInfo, fit: Fit,
                     original: np.ndarray | None = None) -> Encoded | None:
    """`encoded` (dense, pruned or low-rank) quantized on `fit`'s grid with GPTQ codes
    under the tensor's second moments (`info.input_stats`); None when the weight's
    layout does not fit them or `encoded` is no form GPTQ takes.

    A pruned tensor keeps its mask; given the tensor as read (`original`), GPTQ
    starts from it, so the pruned weights' error is fed back too. Of low-rank
    factors W = L R, the one the inputs multiply gets H, the other one the
    moments of its own inputs: L^T H L for R (x L R), R H R^T for L
    (x R^T L^T with W = [N, K]), with the first factor as quantized.
    """
    hessian = info.input_stats.second_moments.load()
    g = info.input_stats.output_moments
    outputs = None if g is None else g.load()
    shift = info.input_stats.shift
    if isinstance(encoded, Dense):
        w = encoded.decode()
        if shift is not None:
            w = moved_target(w, info, hessian, shift.load())
        return gptq_codes(fit(w, info), w, hessian, info, outputs=outputs)
    if isinstance(encoded, Sparse) and isinstance(encoded.values, Dense):
        kept = encoded.values.decode()
        start = kept if original is None or original.shape != kept.shape else original
        if shift is not None:
            start = moved_target(start, info, hessian, shift.load())
            kept = np.where(encoded.mask, start, 0).astype(start.dtype)
        rounded = gptq_codes(fit(kept, info), start, hessian, info, encoded.mask, outputs)
        return None if rounded is None else Sparse(encoded.mask, rounded, encoded.pattern)
    if (isinstance(encoded, LowRank) and isinstance(encoded.left, Dense)
            and isinstance(encoded.right, Dense) and hessian.ndim == 2):
        return _factors(encoded, info, fit, hessian)
    return None


def _factors(encoded: LowRank, info: TensorInfo, fit: Fit,
             hessian: np.ndarray) -> LowRank | None:
    factors = {"left": encoded.left.decode(), "right": encoded.right.decode()}
    infos = {k: factor_info(info, v.shape, k) for k, v in factors.items()}
    first, second = ("left", "right") if info.block_axis == 0 else ("right", "left")
    done = gptq_codes(fit(factors[first], infos[first]), factors[first], hessian, infos[first])
    if done is None:
        return None
    d = done.decode().astype(np.float64)
    with one_blas_thread():
        inner = d.T @ hessian @ d if first == "left" else d @ hessian @ d.T
    other = gptq_codes(fit(factors[second], infos[second]), factors[second],
                       inner.astype(np.float32), infos[second])
    if other is None:
        return None
    return LowRank(done, other) if first == "left" else LowRank(other, done)


def moved_target(w: np.ndarray, info: TensorInfo, hessian: np.ndarray,
                 shift: np.ndarray) -> np.ndarray:
    """W' = W + H~^-1 S W in the weight's layout (float32): the weight that, on the inputs
    as the rounded layers before it give them (H~ = `hessian`), comes closest to the
    original layer's outputs (S = `shift`, see modelpress.formats.onnx.sequential). H~ is
    damped as GPTQ damps it; the damping shrinks the move only, never W itself. `w` as it
    is where the moments do not fit it. (Low-rank factors are not moved: they are rounded
    under H~ towards the factors as they are.)"""
    view = layer_view(tuple(w.shape), info, tuple(hessian.shape))
    if view is None or shift.shape != hessian.shape:
        return w
    forward, back = view
    h = hessian if hessian.ndim == 3 else hessian[None]
    s = shift if shift.ndim == 3 else shift[None]
    rows = forward(np.asarray(w, np.float64))  # [groups, outputs, K]
    with one_blas_thread():
        move = np.linalg.solve(damped(h).astype(np.float64),
                               s.astype(np.float64) @ rows.transpose(0, 2, 1))
    return np.ascontiguousarray(back((rows + move.transpose(0, 2, 1)).astype(np.float32)))


def layer_view(shape: tuple[int, ...], info: TensorInfo, hessian_shape: tuple[int, ...]
               ) -> View | None:
    """Functions from the weight's layout to [groups, outputs, K] and back, or None when
    `hessian_shape` does not fit the weight (then GPTQ cannot round it)."""
    if len(hessian_shape) == 2 and len(shape) == 2 and info.block_axis in (0, 1):
        axis = info.block_axis
        if hessian_shape != (shape[axis],) * 2:
            return None
        return (lambda a: np.moveaxis(a, axis, -1)[None],
                lambda c: np.moveaxis(c[0], -1, axis))
    if len(hessian_shape) == 3 and len(shape) >= 3:  # Conv [M, C/group, *kernel]
        groups, k = hessian_shape[0], hessian_shape[1]
        if shape[0] % groups or int(np.prod(shape[1:])) != k:
            return None
        rows = shape[0] // groups
        return (lambda a: a.reshape(groups, rows, k), lambda c: c.reshape(shape))
    return None


def element_grid(q: Quantized) -> tuple[np.ndarray, np.ndarray]:
    """Each weight's scale and zero point (float32, dense shape) as `q` decodes them."""
    scale = np.broadcast_to(q.expand(q.scale.astype(np.float32)), q.shape)
    if q.zero_point is None:
        return scale, np.zeros((1,) * len(q.shape), np.float32)
    return scale, np.broadcast_to(q.expand(q.zero_point.astype(np.float32)), q.shape)


def gptq_codes(fitted: Quantized, w: np.ndarray, hessian: np.ndarray, info: TensorInfo,
               mask: np.ndarray | None = None,
               outputs: np.ndarray | None = None) -> Quantized | None:
    """`fitted` (a quantization of `w`) with its codes chosen by GPTQ under `hessian`;
    None if `hessian` does not fit the weight. Where `mask` is False the code is the
    zero point (the weight decodes to exactly 0). `outputs`, G over the layer's outputs
    (one matrix, [outputs, outputs]), weighs the output channels too (see
    `optq.rounded_columns`) where the layer has one H and at most MAX_OUTPUT_WEIGHTS weights."""
    view = layer_view(tuple(w.shape), info, tuple(hessian.shape))
    if view is None:
        return None
    forward, back = view
    h = hessian if hessian.ndim == 3 else hessian[None]
    rows = forward(w).shape[1]
    under_g = (outputs is not None and h.shape[0] == 1 and outputs.shape == (rows, rows)
               and w.size <= MAX_OUTPUT_WEIGHTS)
    with one_blas_thread():
        if not under_g and mask is None:
            fitted = searched_grid(fitted, w, hessian)
        scale, zero = element_grid(fitted)
        zero = np.broadcast_to(zero, w.shape)
        args = (np.asarray(forward(np.asarray(w, np.float32))), forward(scale), forward(zero),
                None if mask is None else forward(mask))
        if under_g:
            codes = rounded_columns(*args, h, np.asarray(outputs, np.float64), fitted.bits)
            if mask is None:  # a moved zero point would move the pruned weights off 0
                fitted, codes = _alternated(fitted, w, args, codes, h[0], outputs, back,
                                            forward)
        else:
            codes = descended(*args, damped(h), rounded(*args, h, fitted.bits), fitted.bits)
    return fitted.with_codes(np.ascontiguousarray(back(codes)))


ROUNDS = 2
"""Alternations of grid moves (`gridsearch.regridded`) and code descent under H (x) G."""


def _alternated(fitted: Quantized, w: np.ndarray, args: tuple, codes: np.ndarray,
                hessian: np.ndarray, outputs: np.ndarray, back: Callable, forward: Callable
                ) -> tuple[Quantized, np.ndarray]:
    """`fitted` and `codes` (view [1, R, K]) after up to ROUNDS of: each group's grid moved
    where that lowers tr(G D H D^T) with the codes kept, then the codes descended on it."""
    h = damped(hessian[None])[0].astype(np.float64)
    g = damped(np.asarray(outputs)[None])[0].astype(np.float64)
    for _ in range(ROUNDS):
        moved = regridded(fitted.with_codes(np.ascontiguousarray(back(codes))), w, h, g)
        if moved.scale_code is fitted.scale_code:
            break
        fitted = moved
        scale, zero = element_grid(fitted)
        grid = (forward(scale)[0], forward(np.broadcast_to(zero, w.shape))[0])
        codes = descended_columns(args[0][0], *grid, None, h, g,
                                  forward(moved.codes)[0].astype(np.float64), fitted.bits)[None]
    return fitted, codes
