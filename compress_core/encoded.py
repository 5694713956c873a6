"""The encoded-tensor tree: what a stage turns a weight into.

Every node decodes to a dense float32 array and states the bytes of its most
compact storage (`nbytes`, the ideal a writer can reach; the report uses the
bytes each writer actually wrote). Nodes are plain values: stages build new
nodes and never modify an existing one.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from .dtypes import short_name


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


@dataclass(frozen=True, eq=False)
class Quantized(Encoded):
    """Integer codes on a uniform grid: w = (codes - zero_point) * scale.

    `codes` are signed int8 values in [-2^(bits-1), 2^(bits-1) - 1] with the
    dense shape. `scale` (and `zero_point`, None when symmetric) has the same
    rank as the codes: every axis is 1 except the channel axis (per channel)
    or the block axis, which holds ceil(n / group_size) entries (per group).
    """

    codes: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray | None
    bits: int
    granularity: str
    channel_axis: int | None = None
    block_axis: int | None = None
    group_size: int | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape)

    @property
    def symmetric(self) -> bool:
        return self.zero_point is None

    def expand(self, per_group: np.ndarray) -> np.ndarray:
        """Broadcast a scale-shaped array to the dense shape."""
        if self.granularity != "group":
            return per_group
        axis, n = self.block_axis, self.codes.shape[self.block_axis]
        return np.repeat(per_group, self.group_size, axis=axis).take(np.arange(n), axis=axis)

    def decode(self) -> np.ndarray:
        scale = self.expand(self.scale.astype(np.float32))
        centred = self.codes.astype(np.float32)
        if self.zero_point is not None:
            centred = centred - self.expand(self.zero_point.astype(np.float32))
        return centred * scale

    @property
    def element_bits(self) -> int:
        return self.bits

    @property
    def side_nbytes(self) -> int:
        zp = 0 if self.zero_point is None else math.ceil(self.zero_point.size * self.bits / 8)
        return self.scale.nbytes + zp

    def describe(self) -> str:
        grain = {"tensor": "tensor", "channel": "ch", "group": f"g{self.group_size}"}
        scheme = "sym" if self.symmetric else "asym"
        return f"int{self.bits} {grain[self.granularity]} {scheme}"

    def with_codes(self, codes: np.ndarray) -> Quantized:
        """The same grid with other codes (used when pruning zeroes codes)."""
        return Quantized(codes, self.scale, self.zero_point, self.bits, self.granularity,
                         self.channel_axis, self.block_axis, self.group_size)

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
