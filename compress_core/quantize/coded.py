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

from modelpress.core.encoded import Quantized
from modelpress.core.metrics import BlockSums, ErrorStats
from modelpress.core.quantize.groups import GroupView
from modelpress.core.quantize.multiplier import applies, fit_multipliers
from modelpress.core.scalecode import LogGrid

# Clipping ratios of the mse search (each rounded to its nearest code).
_RATIOS = (1.0, 0.92, 0.85, 0.78)
# Rows are processed in blocks of about this many elements: a block and its
# work buffer stay in a core's L2 cache, and numpy's per-call cost (and the GIL
# hand-offs between threads) is spread over enough elements. Results do not
# depend on it: every group is worked out on its own.
_CHUNK_ELEMENTS = 1 << 17


def quantize_coded(w: np.ndarray, *, bits: int, symmetric: bool, zero_bits: int | None,
                   scale_bits: int, granularity: str, channel_axis: int | None,
                   block_axis: int, group_size: int | None, method: str,
                   super_block: int = 0) -> Quantized:
    """Quantize `w` with scales stored as `scale_bits`-bit codes on a log grid, or, where
    `super_block` inputs tile the block axis, as multipliers of a base per super-block
    (`modelpress.core.quantize.multiplier`)."""
    return _quantize(w, bits=bits, symmetric=symmetric, zero_bits=zero_bits,
                     scale_bits=scale_bits, granularity=granularity, channel_axis=channel_axis,
                     block_axis=block_axis, group_size=group_size, method=method,
                     super_block=super_block, measure=False)[0]


def quantize_coded_measured(w: np.ndarray, *, bits: int, symmetric: bool,
                            zero_bits: int | None, scale_bits: int, granularity: str,
                            channel_axis: int | None, block_axis: int, group_size: int | None,
                            method: str, super_block: int = 0
                            ) -> tuple[Quantized, ErrorStats] | None:
    """`quantize_coded` and the error of its decoding against `w`, or None if `w` holds
    NaN or Inf.

    The encoding is the same as `quantize_coded`'s; the error sums are
    those `metrics.compare` gives on the decoded tensor, to float rounding
    (max_abs exactly), taken from each block's decoded values while they are
    in cache instead of in a second pass over a decoded copy.
    """
    return _quantize(w, bits=bits, symmetric=symmetric, zero_bits=zero_bits,
                     scale_bits=scale_bits, granularity=granularity, channel_axis=channel_axis,
                     block_axis=block_axis, group_size=group_size, method=method,
                     super_block=super_block, measure=True)


def _quantize(w: np.ndarray, *, bits: int, symmetric: bool, zero_bits: int | None,
              scale_bits: int, granularity: str, channel_axis: int | None, block_axis: int,
              group_size: int | None, method: str, super_block: int,
              measure: bool) -> tuple[Quantized, ErrorStats | None] | None:
    w = np.asarray(w, dtype=np.float32)
    if w.ndim == 0:
        granularity = "tensor"
    multiples = granularity == "group" and applies(w.shape, block_axis, group_size or 0,
                                                   super_block)
    view = GroupView(w.shape, granularity, channel_axis, block_axis, group_size)
    stacked = _stacked(w, granularity, block_axis, group_size)
    # Groups along an inner axis ([in, out] MatMul weights): every group is a
    # column of a [groups, group size, rest] block, so each step runs along the
    # contiguous last axis and no transposed copy is made. Else one group per row.
    data = stacked if stacked is not None else view.rows(w)
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    zeros = None if symmetric else _zero_set(bits, zero_bits or bits)
    lo, hi = _group_range(data)
    if measure and not (np.isfinite(lo).all() and np.isfinite(hi).all()):
        return None  # NaN or Inf in some group (min and max carry them): the caller reports it
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        base, best_zero = _covering(lo, hi, qmin, qmax, zeros)
    grid = LogGrid.fit(base, scale_bits)
    group_shape = _group_shape(w.shape, block_axis, group_size) if stacked is not None else None
    per_group = view.per_group if stacked is None else (lambda v: v.reshape(group_shape))
    if multiples:
        start = _start_scales(lo, hi, base, best_zero, grid, qmin, qmax, zeros, method)
        sums = BlockSums() if measure else None
        zero = None if start[1] is None else per_group(start[1].astype(np.int8))
        fitted = fit_multipliers(w, per_group(start[0]), zero, bits=bits,
                                 zero_bits=None if symmetric else zero_bits,
                                 block_axis=block_axis, group_size=group_size,
                                 super_block=super_block, method=method, sums=sums)
        if fitted is not None:
            codes, code = fitted
            quantized = Quantized(codes=codes, scale=code.decode(), zero_point=zero, bits=bits,
                                  granularity="group", block_axis=block_axis,
                                  group_size=group_size, scale_code=code,
                                  zero_bits=None if symmetric else zero_bits)
            return quantized, None if sums is None else sums.stats(w.size)
        # Bases out of float16's range: the log grid's codes, as without multipliers.
    n = data.shape[0]
    codes = np.empty(data.shape, np.int8)
    scale_codes = np.empty(base.shape, np.float32)
    zero = None if symmetric else np.empty(base.shape, np.float32)
    step = max(1, _CHUNK_ELEMENTS // max(data[:1].size, 1))
    work = np.empty((min(step, n),) + data.shape[1:], np.float32)
    steps = _offsets(grid)
    sums = BlockSums() if measure else None
    for start in range(0, n, step):
        part = slice(start, start + step)
        rows, buf = data[part], work[:min(step, n - start)]
        with np.errstate(over="ignore", invalid="ignore"):
            mid = (lo[part] + hi[part]) * np.float32(0.5)
            c, z = _choose(rows, base[part], None if zeros is None else best_zero[part],
                           mid, grid, qmin, qmax, zeros, method, buf, steps)
        s = _widened(_spread(grid.scale(c)), buf)
        zs = None if z is None else _widened(_spread(z), buf)
        q = _grid_codes(rows, s, zs, qmin, qmax, buf)
        codes[part] = q
        scale_codes[part] = c
        if zero is not None:
            zero[part] = z
        if sums is not None:
            sums.add(rows, _decoded(q, s, zs))
    codes = codes.reshape(w.shape) if stacked is not None else view.restore(codes)
    scale_code = grid.code(per_group(scale_codes))
    quantized = Quantized(
        # The grid's stored values are scale_code.decode()'s products: one gather.
        codes=codes, scale=grid.scale(scale_code.codes),
        zero_point=None if zero is None else per_group(zero.astype(np.int8)),
        bits=bits, granularity=granularity,
        channel_axis=channel_axis if granularity == "channel" else None,
        block_axis=block_axis if granularity == "group" else None,
        group_size=group_size if granularity == "group" else None,
        scale_code=scale_code, zero_bits=None if symmetric else zero_bits)
    # Padding of a ragged last group (rows of `view`) is zero and decodes to zero:
    # it adds nothing to the sums, and is not counted.
    return quantized, None if sums is None else sums.stats(w.size)


def _start_scales(lo: np.ndarray, hi: np.ndarray, base: np.ndarray,
                  best_zero: np.ndarray | None, grid: LogGrid, qmin: int, qmax: int,
                  zeros: np.ndarray | None, method: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Each group's scale and zero point the multiplier refit starts from.

    mse: the log grid's nearest code to the covering scale, with the zero point
    centred on the group's mid-range; the refit searches the clipping itself (on
    the synthetic transformer's first six matrices this start gave 0.04 dB less
    than the full search here, which took a third of the quantization time).
    rtn: the covering code and its zero point, so the range still fits.
    """
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        if method == "rtn":
            return grid.scale(grid.covering(base)), best_zero
        scale = grid.scale(grid.nearest(base))
        if zeros is None:
            return scale, None
        mid = (lo + hi) * np.float32(0.5)
        zero = np.clip(np.rint(np.float32((qmin + qmax) / 2) - mid / scale), zeros[0],
                       zeros[-1])
        return scale, zero


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
    best, pick = np.empty(lo.shape, np.float32), np.empty(lo.shape, np.float32)
    flat = [a.reshape(-1) for a in (lo, hi, best, pick)]
    # A block at a time, in place: the temporaries stay in cache.
    for start in range(0, lo.size, _CHUNK_ELEMENTS):
        part = slice(start, start + _CHUNK_ELEMENTS)
        _cover_block(*(a[part] for a in flat), qmin, qmax, zeros)
    return best, pick


def _cover_block(lo: np.ndarray, hi: np.ndarray, best: np.ndarray, pick: np.ndarray,
                 qmin: int, qmax: int, zeros: np.ndarray) -> None:
    """`_covering` with zero points for one block of groups, into `best` and `pick`."""
    need, better, scratch = (np.empty_like(lo) for _ in range(3))
    floor = np.zeros_like(lo)
    # Per zero point, elementwise over the groups; a strictly smaller need wins, so
    # ties keep the first, as argmin would.
    for i, z in enumerate(zeros):
        below, above = np.float32(qmin) - z, np.float32(qmax) - z
        # A zero point at an end of the range leaves no codes on that side: only a
        # group with nothing on that side fits it.
        if below < 0:
            np.divide(lo, below, out=need)
        else:
            need[...] = np.where(lo < 0, np.float32(np.inf), np.float32(0))
        high_need = hi / above if above > 0 else np.where(hi > 0, np.float32(np.inf),
                                                          np.float32(0))
        np.maximum(need, high_need, out=need)
        np.maximum(need, floor, out=need)
        if i == 0:
            best[...], pick[...] = need, z
        else:
            _keep_better(need, best, better)
            _take(pick, z, better, scratch)


def _keep_better(new: np.ndarray, best: np.ndarray, better: np.ndarray) -> None:
    """better = 1.0 where `new` < `best`, else 0.0; best = the lesser of the two.

    As np.where(new < best, new, best) (several times slower with a mixed mask),
    given that a group's candidates are all NaN or none is (NaN enters through
    the group's range); a 0 against a -0 may keep either, which no later
    comparison tells apart.
    """
    np.less(new, best, out=better)
    np.minimum(best, new, out=best)


def _take(values: np.ndarray, new: np.ndarray | np.float32, better: np.ndarray,
          scratch: np.ndarray) -> None:
    """values = new where better (1.0), else unchanged (0.0), in place.

    Exact for the small integers (codes and zero points) it is used on.
    """
    np.subtract(new, values, out=scratch)
    scratch *= better
    values += scratch


def _choose(rows: np.ndarray, base: np.ndarray, best_zero: np.ndarray | None,
            mid: np.ndarray, grid: LogGrid, qmin: int, qmax: int, zeros: np.ndarray | None,
            method: str, buf: np.ndarray,
            steps: list[int]) -> tuple[np.ndarray, np.ndarray | None]:
    """The scale code (and zero point) of each row, trying the covering code and (mse) the
    nearest code `steps` finer (`_offsets`); `buf` (rows' shape) is scratch."""
    code, nearest = grid.covering_and_nearest(base)
    if method == "rtn":
        return code, best_zero
    zero = None if best_zero is None else best_zero.copy()
    err = _sq_error(rows, grid.scale(code), zero, qmin, qmax, buf)
    better, scratch = np.empty_like(code), np.empty_like(code)
    for k in steps:
        cand = np.minimum(nearest + k, grid.cmax)
        s = grid.scale(cand)
        z = None
        if zeros is not None:
            z = np.clip(np.rint(np.float32((qmin + qmax) / 2) - mid / s), zeros[0], zeros[-1])
        e = _sq_error(rows, s, z, qmin, qmax, buf)
        _keep_better(e, err, better)
        _take(code, cand, better, scratch)
        if z is not None:
            _take(zero, z, better, scratch)
    return code, zero


def _offsets(grid: LogGrid) -> list[int]:
    """Code steps (finer scales) from the nearest code that the clipping ratios reach.

    On a coarse grid several ratios round to the same step; each distinct one
    is tried once, with one step finer always among them.
    """
    steps = {int(round(-np.log(r) / grid.step)) for r in _RATIOS} | {0, 1}
    return sorted(steps)


def _grid_codes(rows: np.ndarray, scale: np.ndarray, zero: np.ndarray | None,
                qmin: int, qmax: int, out: np.ndarray) -> np.ndarray:
    """The codes of `rows` on the grid (scale, zero), as float32 integers in `out`."""
    q = np.divide(rows, scale, out=out)
    np.rint(q, out=q)
    if zero is not None:
        q += zero
    return np.clip(q, qmin, qmax, out=q)


def _decoded(codes: np.ndarray, scale: np.ndarray, zero: np.ndarray | None) -> np.ndarray:
    """(codes - zero) * scale in place: the values Quantized.decode gives."""
    if zero is not None:
        codes -= zero
    codes *= scale
    return codes


def _widened(values: np.ndarray, buf: np.ndarray) -> np.ndarray:
    """Per-group values as operands for `buf`'s elements: repeated to full rows in the
    row layout when rows are short (groups), where numpy's loops over a broadcast
    along each row cost more than the copy (measured ~20% of the search on rows of
    16); as they are otherwise (a broadcast along long rows, or along axis 1 of the
    stacked layout, runs at full speed). The same values either way."""
    if buf.ndim != 2 or not 1 < buf.shape[1] <= _WIDEN_ROWS_UP_TO:
        return values
    return np.repeat(values, buf.shape[1], axis=1)


_WIDEN_ROWS_UP_TO = 64


def _sq_error(data: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, qmin: int,
              qmax: int, buf: np.ndarray) -> np.ndarray:
    """Squared error per group of rounding `data` on the grid (scale, zero); `buf` is scratch."""
    s = _widened(_spread(scale), buf)
    np.divide(data, s, out=buf)
    np.rint(buf, out=buf)
    if zero is None:
        np.clip(buf, qmin, qmax, out=buf)
    else:  # the codes' range around the zero point (all integers: exact in float32)
        # (Two binary ufuncs: np.clip with array bounds has no fast broadcasting loop.)
        z = _spread(zero)
        np.maximum(buf, _widened(np.float32(qmin) - z, buf), out=buf)
        np.minimum(buf, _widened(np.float32(qmax) - z, buf), out=buf)
    buf *= s
    buf -= data
    if buf.ndim == 2:
        return np.einsum("ij,ij->i", buf, buf)
    return np.einsum("ijk,ijk->ik", buf, buf)
