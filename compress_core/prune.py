"""Magnitude pruning: the `prune` stage."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .encoded import Dense, Encoded, Quantized, Sparse
from .stage import Stage, option, register
from .tensorinfo import TensorInfo


@register
@dataclass(frozen=True)
class Prune(Stage):
    """Magnitude pruning: zero the smallest weights."""

    id = "prune"
    summary = "magnitude pruning (unstructured)"

    sparsity: float = option(0.5, "fraction of weights set to zero, in [0, 1)",
                             min=0.0, max=1.0, max_open=True)

    def apply(self, encoded: Encoded, info: TensorInfo) -> Encoded:
        values = encoded.decode()
        mask = magnitude_mask(values, self.sparsity)
        if isinstance(encoded, Sparse):
            mask &= encoded.mask
            return Sparse(mask, _zeroed(encoded.values, mask), encoded.pattern)
        if isinstance(encoded, (Dense, Quantized)):
            return Sparse(mask, _zeroed(encoded, mask))
        from .compose import order_error
        raise order_error(self, encoded, info)


def magnitude_mask(values: np.ndarray, sparsity: float) -> np.ndarray:
    """Keep-mask that zeroes exactly round(sparsity * n) of the smallest |values|."""
    flat = np.abs(values).reshape(-1)
    drop = int(round(sparsity * flat.size))
    mask = np.ones(flat.size, dtype=bool)
    if drop > 0:
        # argpartition is deterministic for equal inputs, so ties break the same way each run.
        mask[np.argpartition(flat, drop - 1)[:drop]] = False
    return mask.reshape(values.shape)


def _zeroed(encoded: Encoded, mask: np.ndarray) -> Encoded:
    """The same encoding with every element outside `mask` exactly zero."""
    if isinstance(encoded, Quantized):
        # Zero is exact on the grid: the zero-point code decodes to 0.0.
        return encoded.with_codes(np.where(mask, encoded.codes, encoded.zero_codes()))
    if isinstance(encoded, Dense):
        array = encoded.array
        return Dense(np.where(mask, array, np.zeros((), dtype=array.dtype)))
    from .compose import order_error
    raise order_error(None, encoded, None)
