"""The encoded-tensor tree: what a stage turns a weight into.

Every node decodes to a dense float32 array and states the bytes of its most
compact storage (`nbytes`, the ideal a writer can reach; the report uses the
bytes each writer actually wrote). Nodes are plain values: stages build new
nodes and never modify an existing one.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace

import numpy as np

from modelpress.core.dtypes import short_name
from modelpress.core.quantize.scalecode import MultiplierCode, ScaleCode


class Encoded(ABC):
    """A tensor in some compressed representation."""

    @property
    @abstractmethod
    def shape(self) -> tuple[int, ...]:
        """Shape of the dense tensor this node stands for."""

    @abstractmethod
    def decode(self) -> np.ndarray:
        """The dense tensor as float32."""

    @property
    @abstractmethod
    def element_bits(self) -> int:
        """Bits stored per element of the dense shape (codes, values, indices)."""

    @property
    def side_nbytes(self) -> int:
        """Bytes stored besides the per-element payload (scales, codebooks, factors)."""
        return 0

    @property
    def nbytes(self) -> int:
        """Bytes of the most compact storage of this node."""
        return math.ceil(self.size * self.element_bits / 8) + self.side_nbytes

    @property
    def size(self) -> int:
        """Number of elements of the dense tensor."""
        return math.prod(self.shape)

    @abstractmethod
    def describe(self) -> str:
        """Short human label, e.g. 'int4 g128 sym' or '50% sparse + int8 ch sym'."""


@dataclass(frozen=True, eq=False)
class Dense(Encoded):
    """An uncompressed array in its storage dtype."""

    array: np.ndarray

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    def decode(self) -> np.ndarray:
        return np.asarray(self.array, dtype=np.float32)

    @property
    def element_bits(self) -> int:
        return self.array.dtype.itemsize * 8

    def describe(self) -> str:
        return short_name(self.array.dtype)


GRANULARITIES = ("tensor", "channel", "group")


def scale_shape(shape: tuple[int, ...], granularity: str, channel_axis: int | None,
                block_axis: int | None, group_size: int | None) -> tuple[int, ...]:
    """The shape of a Quantized node's scales (see Quantized) for a dense `shape`."""
    if granularity == "tensor":
        return (1,) * len(shape)
    if granularity == "channel":
        return tuple(d if i == channel_axis else 1 for i, d in enumerate(shape))
    return tuple(-(-d // group_size) if i == block_axis else d for i, d in enumerate(shape))


@dataclass(frozen=True, eq=False)
class Quantized(Encoded):
    """Integer codes on a uniform grid: w = (codes - zero_point) * scale.

    `codes` are signed int8 values in [-2^(bits-1), 2^(bits-1) - 1] with the
    dense shape. `scale` (and `zero_point`, None when symmetric) has the same
    rank as the codes: every axis is 1 except the channel axis (per channel)
    or the block axis, which holds ceil(n / group_size) entries (per group).

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

    def expand(self, per_group: np.ndarray) -> np.ndarray:
        """Broadcast a scale-shaped array to the dense shape."""
        if self.granularity != "group":
            return per_group
        axis, n = self.block_axis, self.codes.shape[self.block_axis]
        return np.repeat(per_group, self.group_size, axis=axis).take(np.arange(n), axis=axis)

    def decode(self) -> np.ndarray:
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


@dataclass(frozen=True, eq=False)
class Sparse(Encoded):
    """A pruned tensor: `values` (full shape, zeros where `mask` is False) and its mask."""

    mask: np.ndarray
    values: Encoded
    pattern: str = "unstructured"

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.mask.shape)

    @property
    def nnz(self) -> int:
        return int(np.count_nonzero(self.mask))

    @property
    def sparsity(self) -> float:
        return 1.0 - self.nnz / max(self.size, 1)

    def decode(self) -> np.ndarray:
        return np.where(self.mask, self.values.decode(), np.float32(0))

    @property
    def element_bits(self) -> int:
        return self.values.element_bits

    @property
    def compact_nbytes(self) -> int:
        """Bitmask plus the kept elements only."""
        kept = math.ceil(self.nnz * self.values.element_bits / 8)
        return math.ceil(self.size / 8) + kept + self.values.side_nbytes

    @property
    def nbytes(self) -> int:
        return min(self.values.nbytes, self.compact_nbytes)

    def describe(self) -> str:
        label = f"{round(100 * self.sparsity)}% sparse"
        if self.pattern != "unstructured":
            label = f"{self.pattern} sparse"
        if isinstance(self.values, Dense):
            return label
        return f"{label} + {self.values.describe()}"


@dataclass(frozen=True, eq=False)
class Scaled(Encoded):
    """Low-precision floats: w = values * scale.

    `values` is fp16, bf16 or fp8 with the dense shape. `scale` is None (a
    plain cast) or a float array of the same rank: all ones for one scale per
    tensor, the channel count on `channel_axis` for one per channel.
    """

    values: np.ndarray
    scale: np.ndarray | None = None
    channel_axis: int | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    @property
    def dtype(self) -> np.dtype:
        """The storage dtype of the values."""
        return self.values.dtype

    def decode(self) -> np.ndarray:
        values = self.values.astype(np.float32)
        if self.scale is None:
            return values
        return values * self.scale.astype(np.float32)

    @property
    def element_bits(self) -> int:
        return self.values.dtype.itemsize * 8

    @property
    def side_nbytes(self) -> int:
        return 0 if self.scale is None else self.scale.nbytes

    @property
    def granularity(self) -> str | None:
        """None without a scale, else 'tensor' or 'channel'."""
        if self.scale is None:
            return None
        return "channel" if self.channel_axis is not None else "tensor"

    def describe(self) -> str:
        grain = {None: "", "tensor": " tensor", "channel": " ch"}[self.granularity]
        return f"{short_name(self.values.dtype)}{grain}"

    def with_values(self, values: np.ndarray) -> Scaled:
        """The same scales with other values (used when pruning zeroes values)."""
        return Scaled(values, self.scale, self.channel_axis)


@dataclass(frozen=True, eq=False)
class LowRank(Encoded):
    """A matrix as the product of two factors: w = left @ right.

    `left` is [rows, rank] and `right` [rank, cols]; each is itself an
    encoded tensor, so later stages can quantize, cast or cluster both.
    """

    left: Encoded
    right: Encoded

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.left.shape[0], self.right.shape[1])

    @property
    def rank(self) -> int:
        return self.left.shape[1]

    def decode(self) -> np.ndarray:
        # Weights near float32's limit can rebuild past it: inf, as the model would compute.
        with np.errstate(over="ignore", invalid="ignore"):
            return np.matmul(self.left.decode(), self.right.decode())

    @property
    def nbytes(self) -> int:
        return self.left.nbytes + self.right.nbytes

    @property
    def element_bits(self) -> int:
        """Average bits per element of the dense matrix (both factors together)."""
        return math.ceil(8 * self.nbytes / max(self.size, 1))

    def describe(self) -> str:
        label = f"rank {self.rank}"
        if isinstance(self.left, Dense):
            return label
        return f"{label} + {self.left.describe()}"


@dataclass(frozen=True, eq=False)
class Palettized(Encoded):
    """Weight clustering: every element is an index into a small codebook.

    `lut` is [C, k] in the model's float dtype: one row for the whole tensor
    (C = 1, `channel_axis` None) or one per channel along `channel_axis`.
    `indices` are uint8 with the dense shape. `zero_index`, when set, is an
    index whose entry is exactly 0 in every row (the pruned positions use it).
    """

    lut: np.ndarray
    indices: np.ndarray
    channel_axis: int | None = None
    zero_index: int | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.indices.shape)

    @property
    def clusters(self) -> int:
        """Entries per codebook."""
        return self.lut.shape[1]

    @property
    def bits(self) -> int:
        """Bits per stored index."""
        return max(1, (self.clusters - 1).bit_length())

    def rows(self, array: np.ndarray) -> np.ndarray:
        """`array` (dense shape) as [C, n]: one row per codebook."""
        if self.channel_axis is None:
            return array.reshape(1, -1)
        return np.moveaxis(array, self.channel_axis, 0).reshape(self.lut.shape[0], -1)

    def unrows(self, rows: np.ndarray) -> np.ndarray:
        """Inverse of `rows`."""
        if self.channel_axis is None:
            return rows.reshape(self.shape)
        moved = (self.shape[self.channel_axis],) + tuple(
            d for i, d in enumerate(self.shape) if i != self.channel_axis)
        return np.moveaxis(rows.reshape(moved), 0, self.channel_axis)

    def decode(self) -> np.ndarray:
        lut = self.lut.astype(np.float32)
        picked = np.take_along_axis(lut, self.rows(self.indices).astype(np.intp), axis=1)
        return np.require(self.unrows(picked), requirements="C")  # keeps a scalar 0-d

    @property
    def element_bits(self) -> int:
        return self.bits

    @property
    def side_nbytes(self) -> int:
        return self.lut.nbytes

    def describe(self) -> str:
        grain = " ch" if self.channel_axis is not None else ""
        return f"palette {self.clusters}{grain} ({self.bits}-bit)"

    def with_indices(self, indices: np.ndarray) -> Palettized:
        """The same codebooks with other indices."""
        return Palettized(self.lut, indices, self.channel_axis, self.zero_index)


def quantized_part(encoded: Encoded) -> Quantized | None:
    """The Quantized node of a tensor (also under a prune mask), or None."""
    if isinstance(encoded, Quantized):
        return encoded
    if isinstance(encoded, Sparse) and isinstance(encoded.values, Quantized):
        return encoded.values
    return None
