"""Group scales refitted as integer multiples of one float16 base per super-block.

`quantize_coded` first finds each group's scale (code) and zero point on
the tensor's log grid. Here each super-block of `super_block` inputs along
the reduction axis gets one float16 base S, and each group's scale becomes
m * S with m in 1..M (`scalecode.max_multiplier`: 14 for 4-bit codes with
2-bit zero points). Then (code - zero) * m is an int8 value and the
super-block is exactly `S * Q` with Q in bytes: onnxruntime runs such a
weight in its 8-bit MatMulNBits kernel, which at 128 input rows measured
0.67-0.99x a float32 MatMul per node where its 4-bit kernel took 1.02-1.63x.

The search starts from each group's nearest scale on the log grid (with
its zero point centred on the group's range) and runs per super-block and
output column: two bases (`_SHRINKS` of the largest group scale over M; a
smaller base gives the multipliers finer steps, at the cost of clipping
the widest groups), and for each base every group takes whichever of the
two multipliers around its scale rounds its weights with less squared
error; the base whose super-block error is least wins. With rtn there is
no search: the start is the log grid's covering code, and base and
multipliers are rounded up, so every group's grid still covers its range.

Storage at 4 bits, groups of 16, super-blocks of 128: 4 + (4 + 2) / 16 +
16 / 128 = 4.5 bits per weight. Measured on the synthetic transformer's
first six matrices: weight SQNR 21.30-21.39 dB against 21.21-21.33 dB for
the log grid's 5-bit codes after their full search (4.44 bits per weight),
in about the same time.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from modelpress.core.metrics import BlockSums
from modelpress.core.scalecode import MultiplierCode, base_shape, max_multiplier

_SHRINKS = (1.0, 0.94)
_CHUNK_ELEMENTS = 1 << 18
# A base must be a positive, finite float16 for every candidate.
_F16_MAX = 65504.0
_F16_MIN = 2.0 ** -23


def applies(shape: tuple[int, ...], block_axis: int, group_size: int, super_block: int) -> bool:
    """Whether `super_block` inputs tile the block axis in whole groups."""
    if not super_block or not group_size or not shape or super_block % group_size:
        return False
    k = shape[block_axis]
    return k >= super_block and k % super_block == 0


def fit_multipliers(w: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, *, bits: int,
                    zero_bits: int | None, block_axis: int, group_size: int, super_block: int,
                    method: str, sums: BlockSums | None
                    ) -> tuple[np.ndarray, MultiplierCode] | None:
    """The codes and multiplier scales of `w` (groups along `block_axis`, `applies` true),
    starting from each group's `scale` and `zero` point (the scales' shape), its error
    added to `sums`; None when a base would leave float16's range."""
    axis, group = block_axis, group_size
    shape = w.shape
    k, ratio = shape[axis], super_block // group
    lead = int(np.prod(shape[:axis], dtype=np.int64))
    rest = int(np.prod(shape[axis + 1:], dtype=np.int64))
    blocks = lead * (k // super_block)
    limit = max_multiplier(bits, zero_bits)
    per_group = scale.shape
    scale = scale.astype(np.float32).reshape(blocks, ratio, 1, rest)
    widest = scale.max(axis=1, keepdims=True) / np.float32(limit)
    if not (widest.max() <= _F16_MAX and widest.min() * min(_SHRINKS) >= _F16_MIN):
        return None
    x = np.asarray(w, np.float32).reshape(blocks, ratio, group, rest)
    if zero is not None:
        zero = zero.astype(np.float32).reshape(blocks, ratio, 1, rest)
    codes = np.empty(x.shape, np.int8)
    mult = np.empty(scale.shape, np.uint8)
    base = np.empty(widest.shape, np.float16)
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    step = max(1, _CHUNK_ELEMENTS // (super_block * rest))
    buf = np.empty((min(step, blocks),) + x.shape[1:], np.float32)
    for start in range(0, blocks, step):
        part = slice(start, start + step)
        z = None if zero is None else zero[part]
        chunk, work = x[part], buf[:min(step, blocks - start)]
        m, b = _choose(chunk, scale[part], z, widest[part], limit, qmin, qmax, method, work)
        grid = m * b.astype(np.float32)
        low, high = _bounds(z, qmin, qmax)
        c = np.clip(np.rint(np.divide(chunk, grid, out=work), out=work), low, high, out=work)
        codes[part] = c if z is None else c + z
        mult[part], base[part] = m, b
        if sums is not None:
            sums.add(chunk, np.multiply(c, grid, out=c))
    code = MultiplierCode(mult.reshape(per_group),
                          base.reshape(base_shape(per_group, axis, ratio)), axis, ratio)
    return codes.reshape(shape), code


def _bounds(zero: np.ndarray | None, qmin: int, qmax: int) -> tuple[Any, Any]:
    """The range of code - zero (codes lie in [qmin, qmax])."""
    if zero is None:
        return np.float32(qmin), np.float32(qmax)
    return np.float32(qmin) - zero, np.float32(qmax) - zero


def _choose(x: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, widest: np.ndarray,
            limit: int, qmin: int, qmax: int, method: str,
            buf: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Multipliers (float32) and float16 bases of a chunk of super-blocks; `buf` is scratch."""
    if method == "rtn":
        b = _rounded_up(widest)
        return np.clip(np.ceil(scale / b.astype(np.float32)), 1, limit), b
    low, high = _bounds(zero, qmin, qmax)
    best = None
    for shrink in _SHRINKS:
        b = (widest * np.float32(shrink)).astype(np.float16)
        wide = b.astype(np.float32)
        ratio = scale / wide
        # Each group takes the better of the two multipliers around its scale.
        m = err = None
        for cand in (np.floor(ratio), np.ceil(ratio)):
            np.clip(cand, 1, limit, out=cand)
            e = _group_error(x, cand * wide, low, high, buf)
            if m is None:
                m, err = cand, e
            else:
                better = e < err
                m, err = np.where(better, cand, m), np.minimum(e, err)
        total = err.sum(axis=1, keepdims=True)
        if best is None:
            best = [m, b, total]
            continue
        better = total < best[2]
        best = [np.where(better, m, best[0]), np.where(better, b, best[1]),
                np.minimum(total, best[2])]
    return best[0], best[1]


def _group_error(x: np.ndarray, grid: np.ndarray, low: Any, high: Any,
                 buf: np.ndarray) -> np.ndarray:
    """Squared error per group of rounding `x` on `grid` (code - zero in [low, high])."""
    np.divide(x, grid, out=buf)
    np.rint(buf, out=buf)
    np.maximum(buf, low, out=buf)
    np.minimum(buf, high, out=buf)
    buf *= grid
    buf -= x
    np.multiply(buf, buf, out=buf)
    return buf.sum(axis=2, keepdims=True)


def _rounded_up(values: np.ndarray) -> np.ndarray:
    """float16 values not below `values` (float32)."""
    b = values.astype(np.float16)
    low = b.astype(np.float32) < values
    return np.where(low, np.nextafter(b, np.float16(np.inf)), b)
