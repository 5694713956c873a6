"""The kernels of calibrated rounding (see `modelpress.core.quantize.gptq`): GPTQ over a
per-weight grid, under one H per group or under H (x) G, and coordinate descent after it."""

from __future__ import annotations

from typing import Callable

import numpy as np

DAMPING = 0.01
"""Added to H's diagonal, as a fraction of its mean diagonal."""
BLOCK = 128
"""Columns rounded between two updates of the rest of the matrix."""
MAX_OUTPUT_WEIGHTS = 1 << 18
"""Largest layer rounded under its output-side moments too (one weight at a time)."""
PASSES = 2
"""Sweeps of coordinate descent over the columns after GPTQ (see `_descended`)."""
_RETRIES = 4  # damping x10 each time H + damping is still not positive definite in float64


def rounded_columns(w: np.ndarray, scale: np.ndarray, zero: np.ndarray,
                     mask: np.ndarray | None, hessian: np.ndarray, outputs: np.ndarray,
                     bits: int) -> np.ndarray:
    """GPTQ under H (x) G: the layer's output error x D weighed by G over its outputs,
    tr(H D G D^T). The inverse of H (x) G factors as U_H (x) U_G, so GPTQ over every
    weight, column by column, is GPTQ within each column over its rows under G
    (each row's rounding error moves the rows after it by U_G), and then, as for one
    H, the column's remaining error moves the later columns by U_H. Rows in order of
    descending diag(G). One weight at a time: for layers of up to MAX_OUTPUT_WEIGHTS."""
    rows = np.argsort(-np.diagonal(outputs), kind="stable")
    ug = inverse_factor(outputs[None], rows[None])[0].astype(np.float64)
    perm = (slice(None), rows)
    w, scale, zero = w[perm], scale[perm], zero[perm]
    keep = None if mask is None else mask[perm]
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1

    def column(values: np.ndarray, s: np.ndarray, z: np.ndarray,
               kept: np.ndarray | None) -> np.ndarray:
        x = values[0].astype(np.float64)
        codes = np.empty(x.shape, np.float32)
        for j in range(x.size):
            c = min(max(float(np.rint(x[j] / s[0, j])) + float(z[0, j]), qmin), qmax)
            if kept is not None and not kept[0, j]:
                c = float(z[0, j])
            codes[j] = c
            x[j + 1:] -= (x[j] - (c - z[0, j]) * s[0, j]) / ug[j, j] * ug[j, j + 1:]
        return codes[None]

    codes = rounded(w, scale, zero, keep, hessian, bits, column)
    codes = descended_columns(w[0], scale[0], zero[0], None if keep is None else keep[0],
                               damped(hessian)[0].astype(np.float64),
                               damped(outputs[rows][:, rows][None])[0].astype(np.float64),
                               codes[0], bits)[None]
    out = np.empty_like(codes)
    out[perm] = codes
    return out


def descended_columns(w: np.ndarray, scale: np.ndarray, zero: np.ndarray,
                       mask: np.ndarray | None, h: np.ndarray, g: np.ndarray,
                       codes: np.ndarray, bits: int) -> np.ndarray:
    """`descended` under H (x) G for one [R, K] layer: the gradient G D H; within a
    column the rows are moved one at a time (a move changes the others' gradient
    through G), the column's moves reach the other columns through H at its end."""
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    c = codes.astype(np.float64)
    s = np.asarray(scale, np.float64)
    grad = g @ ((c - zero) * s - w) @ h
    curve = np.diagonal(g)[:, None] * np.diagonal(h)[None, :]
    for _ in range(PASSES):
        moved = False
        for k in range(w.shape[1]):
            m = np.zeros(w.shape[0])
            for r in np.flatnonzero(_gain(grad[:, k], s[:, k], curve[:, k], c[:, k],
                                          None if mask is None else mask[:, k], qmin, qmax)[1]):
                best, pick = _gain(grad[r:r + 1, k], s[r:r + 1, k], curve[r:r + 1, k],
                                   c[r:r + 1, k], None if mask is None else mask[r:r + 1, k],
                                   qmin, qmax)
                if pick[0]:
                    c[r, k] += pick[0]
                    m[r] = pick[0] * s[r, k]
                    grad[:, k] += g[:, r] * (m[r] * h[k, k])
            if m.any():
                moved = True
                gm = g @ m
                grad += np.outer(gm, h[k])
                grad[:, k] -= gm * h[k, k]   # already added move by move
        if not moved:
            break
    return c.astype(np.int8)


def _gain(grad: np.ndarray, s: np.ndarray, curve: np.ndarray, c: np.ndarray,
          mask: np.ndarray | None, qmin: int, qmax: int) -> tuple[np.ndarray, np.ndarray]:
    """The least change of the squared error by a code step of +-1 (<= 0) and that step
    (0: none lowers it), per weight of gradient `grad`, curvature `curve`, codes `c`."""
    best, pick = np.zeros_like(grad), np.zeros_like(grad)
    for step in (-1.0, 1.0):
        delta = step * s
        gain = delta * (2 * grad + delta * curve)
        allowed = (c + step >= qmin) & (c + step <= qmax)
        if mask is not None:
            allowed &= mask
        better = allowed & (gain < best)
        best, pick = np.where(better, gain, best), np.where(better, step, pick)
    return best, pick


def descended(w: np.ndarray, scale: np.ndarray, zero: np.ndarray, mask: np.ndarray | None,
               hessian: np.ndarray, codes: np.ndarray, bits: int,
               passes: int | None = None) -> np.ndarray:
    """`codes` [G, R, K] moved one step at a time while that lowers the layer's
    squared error tr(D H D^T) (H damped as GPTQ's): per column, every row's code
    +1 or -1, whichever lowers it most, in up to PASSES sweeps over the columns
    (coordinate descent after GPTQ, as CDQuant, Nair & Suggala 2024). GPTQ fixes
    each column once, from the columns before it; a sweep corrects each column
    against all the others as rounded. The gradient G = D H is kept exact: rank-1
    within a block of BLOCK columns, one product per block for the rest. `passes`
    overrides PASSES."""
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    c = codes.astype(np.float32)
    s = np.ascontiguousarray(scale, np.float32)
    h = hessian.astype(np.float32)
    k = w.shape[2]
    for _ in range(PASSES if passes is None else passes):
        grad = np.matmul((c - zero) * s - w, h)        # [G, R, K], symmetric H
        moved = False
        for first in range(0, k, BLOCK):
            last = min(first + BLOCK, k)
            steps = np.zeros(w.shape[:2] + (last - first,), np.float32)
            for col in range(first, last):
                sc = s[:, :, col]
                pick = _gain(grad[:, :, col], sc, h[:, col, col][:, None], c[:, :, col],
                             None if mask is None else mask[:, :, col], qmin, qmax)[1]
                if not pick.any():
                    continue
                moved = True
                c[:, :, col] += pick
                steps[:, :, col - first] = pick * sc
                grad[:, :, first:last] += steps[:, :, col - first, None] * h[:, None, col,
                                                                             first:last]
            if first > 0:
                grad[:, :, :first] += np.matmul(steps, h[:, first:last, :first])
            if last < k:
                grad[:, :, last:] += np.matmul(steps, h[:, first:last, last:])
        if not moved:
            break
    return c.astype(np.int8)


def rounded(w: np.ndarray, scale: np.ndarray, zero: np.ndarray, mask: np.ndarray | None,
             hessian: np.ndarray, bits: int,
             column: Callable[..., np.ndarray] | None = None) -> np.ndarray:
    """int8 codes of `w` [G, R, K] on the per-weight grid (scale, zero) by GPTQ; `column`,
    given, rounds each column (values, scales, zero points, mask [G, R] -> codes [G, R])
    instead of to nearest."""
    groups, _, k = w.shape
    order = np.argsort(-np.diagonal(hessian, axis1=1, axis2=2), axis=1, kind="stable")
    undo = np.argsort(order, axis=1, kind="stable")

    def permuted(a: np.ndarray) -> np.ndarray:
        return np.take_along_axis(a, order[:, None, :], axis=2)

    u = inverse_factor(hessian, order)
    x = permuted(w).astype(np.float32)          # updated in place, column block by block
    s, z = permuted(scale).astype(np.float32), permuted(zero).astype(np.float32)
    keep = None if mask is None else permuted(mask)
    qmin, qmax = np.float32(-(1 << (bits - 1))), np.float32((1 << (bits - 1)) - 1)
    codes = np.empty(x.shape, np.float32)
    for first in range(0, k, BLOCK):
        last = min(first + BLOCK, k)
        block = x[:, :, first:last].copy()
        errors = np.empty_like(block)
        inner = u[:, first:last, first:last]
        for i in range(last - first):
            col = first + i
            if column is not None:
                c = column(block[:, :, i], s[:, :, col], z[:, :, col],
                           None if keep is None else keep[:, :, col])
            else:
                c = np.clip(np.rint(block[:, :, i] / s[:, :, col]) + z[:, :, col], qmin, qmax)
                if keep is not None:
                    c = np.where(keep[:, :, col], c, z[:, :, col])
            codes[:, :, col] = c
            error = (block[:, :, i] - (c - z[:, :, col]) * s[:, :, col]) / inner[:, i, i][:, None]
            block[:, :, i:] -= error[:, :, None] * inner[:, None, i, i:]
            errors[:, :, i] = error
        if last < k:
            x[:, :, last:] -= np.matmul(errors, u[:, first:last, last:])
    return np.take_along_axis(codes, undo[:, None, :], axis=2).astype(np.int8)


def damped(hessian: np.ndarray) -> np.ndarray:
    """H [G, K, K] with GPTQ's first damping on its diagonal (float32)."""
    damp = DAMPING * np.diagonal(hessian, axis1=1, axis2=2).astype(np.float64).mean(axis=1)
    damp = np.where(damp > 0, damp, 1.0)
    return (hessian + damp[:, None, None] * np.eye(hessian.shape[1])).astype(np.float32)


def inverse_factor(hessian: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Upper Cholesky factor of (damped H)^-1 in column order `order`, per group (float32)."""
    h = np.take_along_axis(np.take_along_axis(hessian.astype(np.float64), order[:, :, None],
                                              axis=1), order[:, None, :], axis=2)
    # An input that was always 0 has a zero row and column: the damping alone gives it
    # curvature (it is rounded to nearest, and no error flows through it).
    damp = DAMPING * np.diagonal(h, axis1=1, axis2=2).mean(axis=1)
    damp = np.where(damp > 0, damp, 1.0)
    for _ in range(_RETRIES):
        damped = h + damp[:, None, None] * np.eye(h.shape[1])
        try:
            # With J the reversal, J H J = L L^T gives H = V V^T, V = J L J upper, so
            # H^-1 = U^T U with U = V^-1 = J L^-1 J: one Cholesky and one inverse.
            lower = np.linalg.cholesky(damped[:, ::-1, ::-1])
            return np.ascontiguousarray(_lower_inverse(lower)[:, ::-1, ::-1]).astype(np.float32)
        except np.linalg.LinAlgError:
            damp = damp * 10
    raise np.linalg.LinAlgError("the calibration statistics are not positive semi-definite")


def _lower_inverse(lower: np.ndarray, base: int = 128) -> np.ndarray:
    """Inverse of lower-triangular matrices [G, K, K] by halves, in matrix products:
    [[A, 0], [B, C]]^-1 = [[A^-1, 0], [-C^-1 B A^-1, C^-1]] (a general inverse of K 2304
    took 4.7x as long, on one BLAS thread)."""
    k = lower.shape[-1]
    if k <= base:
        return np.linalg.inv(lower)
    m = k // 2
    first, last = _lower_inverse(lower[:, :m, :m], base), _lower_inverse(lower[:, m:, m:], base)
    out = np.zeros_like(lower)
    out[:, :m, :m], out[:, m:, m:] = first, last
    out[:, m:, :m] = -np.matmul(np.matmul(last, lower[:, m:, :m]), first)
    return out
