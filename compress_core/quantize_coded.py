"""Quantization kernels whose scales are stored as codes on a per-tensor logarithmic grid.

Two passes over a tensor's groups (rows): the first finds each group's
smallest covering scale, from which the tensor's grid is fitted (see
`scalecode`); the second picks, per group, a scale code (and zero point)
and rounds the weights. Every candidate is scored with the scale as it will
be stored, so the search optimises what the decoder sees.

- rtn: the smallest grid scale that still covers the group's range, with
  the zero point that makes the range fit (no clipping, no search).
- mse: the rtn choice and the nearest codes to a few clipped ranges (and
  one step finer), each with its zero point centred on the group's
  mid-range; the candidate with the least squared error wins.

Asymmetric zero points may be narrower than the codes (`zero_bits`): with
2 bits they lie in {-2, -1, 0, 1} around the grid's centre, which costs
2 bits per group and still fits skewed groups (measured on real models:
4-bit codes in groups of 16 with a 2-bit zero point and a 5-bit scale code,
4.44 bits per weight, beat llama.cpp's Q4_0 at 4.5 by 1.5-2.4 dB SQNR).
"""

from __future__ import annotations

import numpy as np

from .encoded import Quantized
from .scalecode import LogGrid

# Clipping ratios of the mse search (each rounded to its nearest code).
_RATIOS = (1.0, 0.92, 0.85, 0.78)
# Rows are processed in blocks of about this many elements (bounded temporaries).
_CHUNK_ELEMENTS = 1 << 16


def quantize_coded(w: np.ndarray, *, bits: int, symmetric: bool, zero_bits: int | None,
                   scale_bits: int, granularity: str, channel_axis: int | None,
                   block_axis: int, group_size: int | None, method: str) -> Quantized:
    """Quantize `w` with scales stored as `scale_bits`-bit codes on a log grid."""
    from .quantize import _GroupView

    w = np.asarray(w, dtype=np.float32)
    if w.ndim == 0:
        granularity = "tensor"
    view = _GroupView(w.shape, granularity, channel_axis, block_axis, group_size)
    stacked = _stacked(w, granularity, block_axis, group_size)
    # Groups along an inner axis ([in, out] MatMul weights): every group is a
    # column of a [groups, group size, rest] block, so each step runs along the
    # contiguous last axis and no transposed copy is made. Else one group per row.
    data = stacked if stacked is not None else view.rows(w)
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    zeros = None if symmetric else _zero_set(bits, zero_bits or bits)
    lo, hi = _group_range(data)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        base, best_zero = _covering(lo, hi, qmin, qmax, zeros)
    grid = LogGrid.fit(base, scale_bits)
    n = data.shape[0]
    codes = np.empty(data.shape, np.int8)
    scale_codes = np.empty(base.shape, np.float32)
    zero = None if symmetric else np.empty(base.shape, np.float32)
    step = max(1, _CHUNK_ELEMENTS // max(data[:1].size, 1))
    for start in range(0, n, step):
        part = slice(start, start + step)
        with np.errstate(over="ignore", invalid="ignore"):
            mid = (lo[part] + hi[part]) * np.float32(0.5)
            c, z = _choose(data[part], base[part], None if zeros is None else best_zero[part],
                           mid, grid, qmin, qmax, zeros, method)
        s = _spread(grid.scale(c))
        q = _grid_codes(data[part], s, None if z is None else _spread(z), qmin, qmax)
        codes[part] = q
        scale_codes[part] = c
        if zero is not None:
            zero[part] = z
    if stacked is not None:
        shape = _group_shape(w.shape, block_axis, group_size)
        codes, per_group = codes.reshape(w.shape), (lambda v: v.reshape(shape))
    else:
        codes, per_group = view.restore(codes), view.per_group
    scale_code = grid.code(per_group(scale_codes))
    return Quantized(
        codes=codes, scale=scale_code.decode(),
        zero_point=None if zero is None else per_group(zero.astype(np.int8)),
        bits=bits, granularity=granularity,
        channel_axis=channel_axis if granularity == "channel" else None,
        block_axis=block_axis if granularity == "group" else None,
        group_size=group_size if granularity == "group" else None,
        scale_code=scale_code, zero_bits=None if symmetric else zero_bits)


# The stacked layout pays off once the groups' inner extent fills a vector register or so.
_STACK_FROM = 16


def _stacked(w: np.ndarray, granularity: str, block_axis: int,
             group_size: int | None) -> np.ndarray | None:
    """`w` as [groups, group size, rest] when its groups run along an inner axis, else None."""
    if granularity != "group" or not group_size or w.ndim < 2:
        return None
    k = w.shape[block_axis]
    rest = int(np.prod(w.shape[block_axis + 1:], dtype=np.int64))
    if k % group_size or rest < _STACK_FROM:
        return None
    lead = int(np.prod(w.shape[:block_axis], dtype=np.int64))
    return np.ascontiguousarray(w).reshape(lead * (k // group_size), group_size, rest)


def _group_shape(shape: tuple[int, ...], block_axis: int, group_size: int) -> tuple[int, ...]:
    """The shape of per-group values: the tensor's, with the block axis counting groups."""
    out = list(shape)
    out[block_axis] //= group_size
    return tuple(out)


def _spread(values: np.ndarray) -> np.ndarray:
    """Per-group values shaped to broadcast over their groups' elements (axis 1)."""
    return values.reshape(values.shape[:1] + (1,) + values.shape[1:])


def _zero_set(bits: int, zero_bits: int) -> np.ndarray:
    """The zero points a `zero_bits`-wide field can hold, within the code range."""
    half = 1 << (min(zero_bits, bits) - 1)
    return np.arange(-half, half, dtype=np.float32)


def _group_range(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Minimum and maximum of each group (along axis 1).

    Groups of a power-of-two size are folded in halves: numpy's reductions
    along a short last axis are several times slower than elementwise ops.
    """
    if data.ndim == 3:  # stacked: a reduction over axis 1 runs along the contiguous axis
        return data.min(axis=1), data.max(axis=1)
    lo, hi = data, data
    while lo.shape[1] > 1 and lo.shape[1] % 2 == 0:
        half = lo.shape[1] // 2
        lo = np.minimum(lo[:, :half], lo[:, half:])
        hi = np.maximum(hi[:, :half], hi[:, half:])
    return lo.min(axis=1), hi.max(axis=1)


def _covering(lo: np.ndarray, hi: np.ndarray, qmin: int, qmax: int,
              zeros: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    """Per row: the smallest scale whose grid holds [lo, hi] (and its zero point)."""
    if zeros is None:
        return np.maximum(-lo, hi) / np.float32(qmax), None
    # Per zero point, elementwise over the groups; a strictly smaller need wins, so
    # ties (and a NaN group, whose needs are all NaN) keep the first, as argmin would.
    best, pick = None, None
    for z in zeros:
        below, above = np.float32(qmin) - z, np.float32(qmax) - z
        # A zero point at an end of the range leaves no codes on that side: only a
        # group with nothing on that side fits it.
        low_need = lo / below if below < 0 else np.where(lo < 0, np.float32(np.inf),
                                                         np.float32(0))
        high_need = hi / above if above > 0 else np.where(hi > 0, np.float32(np.inf),
                                                          np.float32(0))
        need = np.maximum(np.maximum(low_need, high_need, dtype=np.float32), 0)
        if best is None:
            best, pick = need, np.full(need.shape, z, np.float32)
        else:
            better = need < best
            best = np.where(better, need, best)
            pick = np.where(better, z, pick)
    return best, pick


def _choose(rows: np.ndarray, base: np.ndarray, best_zero: np.ndarray | None,
            mid: np.ndarray, grid: LogGrid, qmin: int, qmax: int, zeros: np.ndarray | None,
            method: str) -> tuple[np.ndarray, np.ndarray | None]:
    """The scale code (and zero point) of each row."""
    code = grid.covering(base)
    if method == "rtn":
        return code, best_zero
    zero = best_zero
    buf = np.empty_like(rows)
    err = _sq_error(rows, grid.scale(code), zero, qmin, qmax, buf)
    nearest = grid.nearest(base)
    candidates = [np.minimum(nearest + k, grid.cmax) for k in _offsets(grid)]
    for cand in candidates:
        s = grid.scale(cand)
        z = None
        if zeros is not None:
            z = np.clip(np.rint(np.float32((qmin + qmax) / 2) - mid / s), zeros[0], zeros[-1])
        e = _sq_error(rows, s, z, qmin, qmax, buf)
        better = e < err
        err = np.where(better, e, err)
        code = np.where(better, cand, code)
        if z is not None:
            zero = np.where(better, z, zero)
    return code, zero


def _offsets(grid: LogGrid) -> list[int]:
    """Code steps (finer scales) from the nearest code that the clipping ratios reach.

    On a coarse grid several ratios round to the same step; each distinct one
    is tried once, with one step finer always among them.
    """
    steps = {int(round(-np.log(r) / grid.step)) for r in _RATIOS} | {0, 1}
    return sorted(steps)


def _grid_codes(rows: np.ndarray, scale: np.ndarray, zero: np.ndarray | None,
                qmin: int, qmax: int) -> np.ndarray:
    q = np.rint(rows / scale)
    if zero is not None:
        q += zero
    return np.clip(q, qmin, qmax, out=q).astype(np.int8)


def _sq_error(data: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, qmin: int,
              qmax: int, buf: np.ndarray) -> np.ndarray:
    """Squared error per group of rounding `data` on the grid (scale, zero); `buf` is scratch."""
    s = _spread(scale)
    np.divide(data, s, out=buf)
    np.rint(buf, out=buf)
    if zero is None:
        np.clip(buf, qmin, qmax, out=buf)
    else:  # the codes' range around the zero point (all integers: exact in float32)
        # (Two binary ufuncs: np.clip with array bounds has no fast broadcasting loop.)
        z = _spread(zero)
        np.maximum(buf, np.float32(qmin) - z, out=buf)
        np.minimum(buf, np.float32(qmax) - z, out=buf)
    buf *= s
    buf -= data
    if buf.ndim == 2:
        return np.einsum("ij,ij->i", buf, buf)
    return np.einsum("ijk,ijk->ik", buf, buf)
