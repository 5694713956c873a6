"""Pruning: exact counts, composition with quantization in both orders."""

from __future__ import annotations

import numpy as np
import pytest

from modelpress import Dense, Prune, Quantize, Quantized, Sparse, TensorInfo
from modelpress.core.errors import UnsupportedTensorError

from conftest import rng_weights

INFO = TensorInfo("w", (32, 64), np.dtype(np.float32), True, 0, 1)


@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.5, 0.9])
def test_prune_zeroes_exact_count_of_smallest(sparsity: float) -> None:
    w = rng_weights(32, 64)
    out = Prune(sparsity=sparsity).apply(Dense(w), INFO)
    assert isinstance(out, Sparse)
    dropped = round(sparsity * w.size)
    assert int((~out.mask).sum()) == dropped
    if dropped:
        assert np.abs(w[~out.mask]).max() <= np.abs(w[out.mask]).min()
    np.testing.assert_array_equal(out.decode(), np.where(out.mask, w, 0))
    assert out.describe() == f"{round(100 * sparsity)}% sparse"


def test_quantize_then_prune_zeroes_codes() -> None:
    w = rng_weights(32, 64)
    for scheme in ("sym", "asym"):
        q = Quantize(bits=8, scheme=scheme).apply(Dense(w), INFO)
        out = Prune(sparsity=0.5).apply(q, INFO)
        assert isinstance(out, Sparse) and isinstance(out.values, Quantized)
        assert int((out.decode() == 0).sum()) >= w.size // 2
        kept = out.mask
        np.testing.assert_array_equal(out.decode()[kept], q.decode()[kept])
        assert out.describe() == f"50% sparse + int8 ch {scheme}"


def test_prune_then_quantize_keeps_mask() -> None:
    w = rng_weights(32, 64)
    pruned = Prune(sparsity=0.5).apply(Dense(w), INFO)
    out = Quantize(bits=8).apply(pruned, INFO)
    np.testing.assert_array_equal(out.mask, pruned.mask)
    assert np.all(out.decode()[~pruned.mask] == 0)


def test_compact_storage_counts_bitmask_and_kept_codes() -> None:
    w = rng_weights(32, 64)
    out = Quantize(bits=4, group_size=32).apply(Prune(sparsity=0.75).apply(Dense(w), INFO), INFO)
    nnz = 32 * 64 // 4
    expected = 32 * 64 // 8 + nnz * 4 // 8 + out.values.scale.nbytes
    assert out.compact_nbytes == expected
    assert out.nbytes == min(expected, out.values.nbytes)


def test_double_quantize_is_refused_with_a_fix() -> None:
    q = Quantize(bits=8).apply(Dense(rng_weights(32, 64)), INFO)
    with pytest.raises(UnsupportedTensorError, match="keep one quantize stage per tensor"):
        Quantize(bits=4).apply(q, INFO)
