"""The contract every node of the encoded-tensor tree follows, and its plain leaf.

`Encoded` is what a stage turns a weight into (see `modelpress.core.encoded`
for the whole tree); `Dense` is an array left uncompressed.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from modelpress.core.dtypes import short_name


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
