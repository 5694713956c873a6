"""Group scales stored as small codes on a per-tensor logarithmic grid ("double quantization").

A tensor's group scales span a few octaves; storing each one as a 4-8-bit
code on a logarithmic grid costs a fraction of a float and loses almost
nothing. The grid is held as two small tables whose product is the scale:

    scale = high[code >> low_bits] * low[code & (2^low_bits - 1)]

One float32 multiplication of two stored float32 values is correctly rounded
everywhere (numpy, onnxruntime's folded `Mul`), so a decoder in any runtime
gets bit-identical scales; an `Exp` would differ in the last bit between
libraries. With `low_bits = bits // 2` the tables hold 2^ceil(b/2) +
2^floor(b/2) floats (12 for 5-bit codes, 32 for 8-bit codes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

SCALE_BITS = (4, 5, 6, 7, 8)
"""The code widths a grid supports (codes are stored as uint8)."""

# The grid's lower end ignores the smallest 0.5% of a tensor's group scales
# (near-empty groups would otherwise stretch it and coarsen every step).
_LOW_PERCENTILE = 0.5
_MIN_OCTAVES, _MAX_OCTAVES = 0.5, 24.0


@dataclass(frozen=True, eq=False)
class ScaleCode:
    """Scales as codes into a two-table logarithmic grid (see the module doc)."""

    codes: np.ndarray   # uint8, the shape of the scales they stand for
    high: np.ndarray    # float32 [2^(bits - bits // 2)]
    low: np.ndarray     # float32 [2^(bits // 2)]
    bits: int

    @property
    def low_bits(self) -> int:
        """Bits of a code that index the `low` table."""
        return self.bits // 2

    def decode(self) -> np.ndarray:
        """The scales as float32, exactly as every runtime computes them."""
        return decode_codes(self.codes, self.high, self.low, self.bits)

    @property
    def table_nbytes(self) -> int:
        """Bytes of the two tables."""
        return self.high.nbytes + self.low.nbytes

    def code_nbytes(self, extra_bits: int = 0) -> int:
        """Bytes of the codes packed at `bits` (+ `extra_bits` per code, e.g. a zero point)."""
        return math.ceil(self.codes.size * (self.bits + extra_bits) / 8)

    def with_codes(self, codes: np.ndarray) -> ScaleCode:
        """The same grid with other codes."""
        return ScaleCode(codes, self.high, self.low, self.bits)

    def transposed(self) -> ScaleCode:
        """The same grid for the transposed (2-D) scales."""
        return self.with_codes(np.ascontiguousarray(self.codes.T))


def decode_codes(codes: np.ndarray, high: np.ndarray, low: np.ndarray, bits: int) -> np.ndarray:
    """`high[code >> bits//2] * low[code & mask]` in float32."""
    codes = np.asarray(codes).astype(np.intp)
    lb = bits // 2
    return (np.asarray(high, np.float32)[codes >> lb]
            * np.asarray(low, np.float32)[codes & ((1 << lb) - 1)]).astype(np.float32)


class LogGrid:
    """A logarithmic grid of 2^bits scales: scale(c) ~ top * exp(-step * c), c = 0 is largest."""

    def __init__(self, top: float, step: float, bits: int) -> None:
        self.bits, self.cmax = bits, (1 << bits) - 1
        self.top, self.step = float(top), float(step)
        lb = bits // 2
        j = np.arange(1 << (bits - lb), dtype=np.float64)
        i = np.arange(1 << lb, dtype=np.float64)
        self.high = (self.top * np.exp(-self.step * j * (1 << lb))).astype(np.float32)
        self.low = np.exp(-self.step * i).astype(np.float32)
        self.values = decode_codes(np.arange(self.cmax + 1), self.high, self.low, bits)

    @classmethod
    def fit(cls, scales: np.ndarray, bits: int) -> LogGrid:
        """A grid spanning the positive `scales` of one tensor (largest exactly on code 0)."""
        positive = scales[scales > 0]
        if positive.size == 0:
            return cls(1.0, math.log(2.0) / ((1 << bits) - 1), bits)
        top = float(np.float32(positive.max()))
        floor = float(np.percentile(positive, _LOW_PERCENTILE)) if positive.size > 1 else top
        octaves = math.log2(top / max(floor, top * 2.0 ** -_MAX_OCTAVES)) + 0.25
        octaves = min(max(octaves, _MIN_OCTAVES), _MAX_OCTAVES)
        grid = cls(top, octaves * math.log(2.0) / ((1 << bits) - 1), bits)
        # float32 rounding of the tables must not put code 0 below the largest scale.
        if grid.values[0] < top:
            grid = cls(float(np.nextafter(np.float32(top), np.float32(np.inf))), grid.step, bits)
        return grid

    def nearest(self, scales: np.ndarray) -> np.ndarray:
        """The code whose scale is nearest on the log scale (as float32 codes)."""
        return self._nearest(self._position(scales))

    def covering(self, scales: np.ndarray) -> np.ndarray:
        """The code of the smallest grid scale not below `scales` (code 0 when none is)."""
        return self._covering(self._position(scales), scales)

    def covering_and_nearest(self, scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """`covering(scales)` and `nearest(scales)`, sharing their logarithms."""
        position = self._position(scales)
        return self._covering(position, scales), self._nearest(position)

    def _position(self, scales: np.ndarray) -> np.ndarray:
        """Where `scales` fall on the grid, in (fractional) codes."""
        with np.errstate(divide="ignore"):
            return np.log(self.top / np.maximum(scales, 1e-38)) / self.step

    def _nearest(self, position: np.ndarray) -> np.ndarray:
        return np.clip(np.rint(position), 0, self.cmax).astype(np.float32)

    def _covering(self, position: np.ndarray, scales: np.ndarray) -> np.ndarray:
        c = np.clip(np.floor(position), 0, self.cmax).astype(np.intp)
        # The log estimate can land one code off either way; settle it on the stored values.
        # (Integer arithmetic on the conditions: np.where with a mixed mask is much slower.)
        up = np.minimum(c + 1, self.cmax)
        c += (self.values[up] >= scales) * (up - c)
        c -= (self.values[c] < scales) & (c > 0)
        return c.astype(np.float32)

    def scale(self, codes: np.ndarray) -> np.ndarray:
        """The stored scale of each code (float32)."""
        return self.values[codes.astype(np.intp)]

    def code(self, codes: np.ndarray) -> ScaleCode:
        """A ScaleCode holding `codes` on this grid."""
        return ScaleCode(codes.astype(np.uint8), self.high, self.low, self.bits)


MULTIPLIER_BITS = 4
"""Bits per stored group multiplier (values 1..15)."""


def max_multiplier(bits: int, zero_bits: int | None) -> int:
    """The largest multiplier m with |m * (code - zero)| <= 127 for every code and zero point.

    Every weight is then base * Q with Q = m * (code - zero) an int8 value, so a
    super-block is one blocked 8-bit DequantizeLinear (zero point 128 on bytes):
    4-bit codes with 2-bit zero points reach |code - zero| = 9 and allow 14.
    """
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if zero_bits is None:
        reach = -qmin
    else:
        half = 1 << (min(zero_bits, bits) - 1)
        reach = max(qmax + half, half - 1 - qmin)
    return min((1 << MULTIPLIER_BITS) - 1, 127 // reach)


@dataclass(frozen=True, eq=False)
class MultiplierCode:
    """Group scales as small integer multiples of one float16 base per super-block.

    scale = base[super-block] * multiplier, with `ratio` consecutive groups
    along `axis` of the scales sharing a base (the idea of llama.cpp's
    K-quants). The product of a float16 and an integer below 16 is exact in
    float32, so every runtime decodes the same scales; and a weight's
    (code - zero) * multiplier is a small integer, which lets onnxruntime run
    the tensor in its 8-bit kernel with one float scale per super-block.
    """

    multipliers: np.ndarray   # uint8 in 1..15, the shape of the scales they stand for
    base: np.ndarray          # float16, the scales' shape with `axis` counting super-blocks
    axis: int
    ratio: int                # groups per super-block

    bits = MULTIPLIER_BITS

    def decode(self) -> np.ndarray:
        """The scales as float32 (exact products)."""
        return decode_multipliers(self.multipliers, self.base, self.axis, self.ratio)

    @property
    def table_nbytes(self) -> int:
        """Bytes of the float16 bases."""
        return self.base.nbytes

    def code_nbytes(self, extra_bits: int = 0) -> int:
        """Bytes of the multipliers packed at 4 bits (+ `extra_bits` per group)."""
        return math.ceil(self.multipliers.size * (self.bits + extra_bits) / 8)

    def transposed(self) -> MultiplierCode:
        """The same code for the transposed (2-D) scales."""
        return MultiplierCode(np.ascontiguousarray(self.multipliers.T),
                              np.ascontiguousarray(self.base.T), 1 - self.axis, self.ratio)


def base_shape(scale_shape: tuple[int, ...], axis: int, ratio: int) -> tuple[int, ...]:
    """The shape of the bases for scales of `scale_shape` (`ratio` groups per base)."""
    return tuple(-(-d // ratio) if i == axis else d for i, d in enumerate(scale_shape))


def decode_multipliers(multipliers: np.ndarray, base: np.ndarray, axis: int,
                       ratio: int) -> np.ndarray:
    """`base` repeated `ratio` times along `axis` (cut to the multipliers' length) times them."""
    n = multipliers.shape[axis]
    spread = np.repeat(np.asarray(base, np.float32), ratio, axis=axis).take(np.arange(n), axis=axis)
    return (spread * multipliers.astype(np.float32)).astype(np.float32)
