"""The Quantized node of the encoded-tensor tree: integer codes on a uniform grid,
with scales stored as floats or as codes (`modelpress.core.scalecode`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from modelpress.core.node import Encoded
from modelpress.core.scalecode import MultiplierCode, ScaleCode, base_shape


GRANULARITIES = ("tensor", "channel", "group")


def scale_shape(shape: tuple[int, ...], granularity: str, channel_axis: int | None,
                block_axis: int | None, group_size: int | None,
                block_span: int = 1) -> tuple[int, ...]:
    """The shape of a Quantized node's scales (see Quantized) for a dense `shape`."""
    if granularity == "tensor":
        return (1,) * len(shape)
    if granularity == "channel":
        return tuple(d if i == channel_axis else 1 for i, d in enumerate(shape))
    if block_span > 1:
        merged = scale_shape(merged_shape(shape, block_axis, block_span), granularity,
                             channel_axis, block_axis, group_size)
        return spread_shape(merged, block_axis, block_span)
    return tuple(-(-d // group_size) if i == block_axis else d for i, d in enumerate(shape))


def merged_shape(shape: tuple[int, ...], axis: int, span: int) -> tuple[int, ...]:
    """`shape` with the `span` axes from `axis` on flattened into one (row-major)."""
    return tuple(shape[:axis]) + (math.prod(shape[axis:axis + span]),) + tuple(shape[axis + span:])


def spread_shape(merged: tuple[int, ...], axis: int, span: int) -> tuple[int, ...]:
    """Per-group values of a merged shape back at the tensor's rank: the merged axis keeps
    its count of groups and the other `span - 1` axes it stands for get 1."""
    return tuple(merged[:axis + 1]) + (1,) * (span - 1) + tuple(merged[axis + 1:])


@dataclass(frozen=True, eq=False)
class Quantized(Encoded):
    """Integer codes on a uniform grid: w = (codes - zero_point) * scale.

    `codes` are signed int8 values in [-2^(bits-1), 2^(bits-1) - 1] with the
    dense shape. `scale` (and `zero_point`, None when symmetric) has the same
    rank as the codes: every axis is 1 except the channel axis (per channel)
    or the block axis, which holds ceil(n / group_size) entries (per group).

    `block_span` > 1 runs the groups along the `block_span` axes from
    `block_axis` on, flattened row-major (a convolution kernel's
    [C/g, kh, kw] per output channel, when C/g is shorter than a group); the
    block axis of the scales then counts the groups and the other axes of
    the span are 1. `merged()` is the same node on the flattened shape.

    `scale_code`, when set, is how the scales are stored: codes on a
    per-tensor logarithmic grid (ScaleCode), or integer multipliers of a
    float16 base per super-block of groups (MultiplierCode); `scale` is
    their exact decoding. `zero_bits` is the width a zero point is stored in (None: `bits`);
    zero points then lie in [-2^(zero_bits-1), 2^(zero_bits-1) - 1].
    """

    codes: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray | None
    bits: int
    granularity: str
    channel_axis: int | None = None
    block_axis: int | None = None
    group_size: int | None = None
    scale_code: ScaleCode | MultiplierCode | None = None
    zero_bits: int | None = None
    block_span: int = 1

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape)

    @property
    def symmetric(self) -> bool:
        return self.zero_point is None

    @property
    def scale_bits(self) -> int | None:
        """Bits per stored log-grid scale code, or None (float scales or multipliers)."""
        return self.scale_code.bits if isinstance(self.scale_code, ScaleCode) else None

    @property
    def super_block(self) -> int | None:
        """Inputs per float16 base when scales are multipliers, else None."""
        if not isinstance(self.scale_code, MultiplierCode):
            return None
        return self.scale_code.ratio * self.group_size

    @property
    def stored_zero_bits(self) -> int:
        """Bits per stored zero point (0 when symmetric)."""
        if self.zero_point is None:
            return 0
        return self.zero_bits or self.bits

    def merged(self) -> Quantized:
        """The same node with the axes of its block span flattened into one (span 1)."""
        if self.block_span == 1:
            return self
        shape = merged_shape(self.shape, self.block_axis, self.block_span)
        per_group = scale_shape(shape, "group", None, self.block_axis, self.group_size)
        return _reshaped(self, shape, per_group, 1)

    def spread(self, shape: tuple[int, ...], span: int) -> Quantized:
        """This node, grouped along its block axis of the merged form of `shape`
        (`merged_shape`), as a node of `shape` with a block span of `span`."""
        return _reshaped(self, shape, spread_shape(self.scale.shape, self.block_axis, span), span)

    def expand(self, per_group: np.ndarray) -> np.ndarray:
        """Broadcast a scale-shaped array to the dense shape."""
        if self.granularity != "group":
            return per_group
        if self.block_span > 1:
            merged = self.merged()
            return merged.expand(per_group.reshape(merged.scale.shape)).reshape(self.shape)
        axis, n = self.block_axis, self.codes.shape[self.block_axis]
        return np.repeat(per_group, self.group_size, axis=axis).take(np.arange(n), axis=axis)

    def decode(self) -> np.ndarray:
        if self.block_span > 1:
            return self.merged().decode().reshape(self.shape)
        split = self._group_split()
        if split is not None:
            # Whole groups: each group's scale and zero point broadcast over it (the
            # same products as the expanded form, without expanded copies).
            codes_shape, group_shape = split
            centred = self.codes.reshape(codes_shape).astype(np.float32)
            if self.zero_point is not None:
                centred = centred - self.zero_point.astype(np.float32).reshape(group_shape)
            decoded = centred * self.scale.astype(np.float32).reshape(group_shape)
            return decoded.reshape(self.codes.shape)
        scale = self.expand(self.scale.astype(np.float32))
        centred = self.codes.astype(np.float32)
        if self.zero_point is not None:
            centred = centred - self.expand(self.zero_point.astype(np.float32))
        return centred * scale

    def _group_split(self) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
        """Shapes with the block axis split into (groups, group size) for codes and
        (groups, 1) for per-group values; None unless the groups tile the axis."""
        if self.granularity != "group" or not self.group_size or self.block_axis is None:
            return None
        axis, shape = self.block_axis, tuple(self.codes.shape)
        k = shape[axis]
        groups_shape = shape[:axis] + (k // self.group_size,) + shape[axis + 1:]
        if k % self.group_size or self.scale.shape != groups_shape or (
                self.zero_point is not None and self.zero_point.shape != groups_shape):
            return None
        head, tail = shape[:axis], shape[axis + 1:]
        groups = k // self.group_size
        return head + (groups, self.group_size) + tail, head + (groups, 1) + tail

    @property
    def element_bits(self) -> int:
        return self.bits

    @property
    def side_nbytes(self) -> int:
        zero_bits = self.stored_zero_bits
        if self.scale_code is not None:
            return self.scale_code.code_nbytes(zero_bits) + self.scale_code.table_nbytes
        zp = math.ceil(self.scale.size * zero_bits / 8)
        return self.scale.nbytes + zp

    def describe(self) -> str:
        grain = {"tensor": "tensor", "channel": "ch", "group": f"g{self.group_size}"}
        scheme = "sym" if self.symmetric else "asym"
        label = f"int{self.bits} {grain[self.granularity]} {scheme}"
        if self.super_block:
            label += f" m{self.scale_code.bits}x{self.super_block}"
        elif self.scale_code is not None:
            label += f" s{self.scale_code.bits}"
        if self.zero_point is not None and self.stored_zero_bits != self.bits:
            label += f" z{self.stored_zero_bits}"
        return label

    def with_codes(self, codes: np.ndarray) -> Quantized:
        """The same grid with other codes (used when pruning zeroes codes)."""
        return replace(self, codes=codes)

    def zero_codes(self) -> np.ndarray:
        """The code that decodes to exactly 0.0 at every position."""
        if self.zero_point is None:
            return np.zeros(self.shape, dtype=np.int8)
        return np.broadcast_to(self.expand(self.zero_point), self.shape).astype(np.int8)


def _reshaped(q: Quantized, shape: tuple[int, ...], per_group: tuple[int, ...],
              span: int) -> Quantized:
    """`q` with codes of `shape`, per-group values (and scale codes) of `per_group` shape."""
    code = q.scale_code
    if isinstance(code, ScaleCode):
        code = code.with_codes(code.codes.reshape(per_group))
    elif isinstance(code, MultiplierCode):
        code = MultiplierCode(code.multipliers.reshape(per_group), code.base.reshape(
            base_shape(per_group, code.axis, code.ratio)), code.axis, code.ratio)
    return replace(q, codes=q.codes.reshape(shape), scale=q.scale.reshape(per_group),
                   zero_point=None if q.zero_point is None else q.zero_point.reshape(per_group),
                   scale_code=code, block_span=span)
