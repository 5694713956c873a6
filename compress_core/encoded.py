"""The encoded-tensor tree: what a stage turns a weight into.

Every node decodes to a dense float32 array and states the bytes of its most
compact storage (`nbytes`, the ideal a writer can reach; the report uses the
bytes each writer actually wrote). Nodes are plain values: stages build new
nodes and never modify an existing one.

The nodes live in three modules, all exported here: `node` (the `Encoded`
contract and `Dense`), `quantized` (`Quantized`) and this one (the others).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from modelpress.core.blas import one_blas_thread
from modelpress.core.dtypes import short_name
from modelpress.core.node import Dense, Encoded
from modelpress.core.quantized import GRANULARITIES, Quantized, merged_shape, scale_shape

__all__ = ["GRANULARITIES", "Dense", "Encoded", "LowRank", "Palettized", "Quantized", "Scaled",
           "Sparse", "merged_shape", "quantized_part", "scale_shape"]


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
        left, right = self.left.decode(), self.right.decode()
        # A threaded product rounds with the thread count: one thread, so `decompress` writes
        # the same bytes on every machine. Weights near float32's limit can rebuild past it:
        # inf, as the model would compute.
        with one_blas_thread(), np.errstate(over="ignore", invalid="ignore"):
            return np.matmul(left, right)

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
