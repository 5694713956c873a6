"""Pruning patterns: exact N:M on the written files, and the exact global threshold."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from modelpress import (Dense, Options, Prune, Quantize, Recipe, Sparse, TensorInfo, compress, decompress)
from modelpress.core.pipeline import encode
from modelpress.core.prune import global_threshold, nm_mask
from modelpress.formats import open_model

from conftest import SAMPLES, matmul_model, rng_weights, write_safetensors


def groups_along_input(array: np.ndarray, info: TensorInfo, m: int) -> np.ndarray:
    """Nonzero count of every group of m consecutive weights along the input axis."""
    moved = np.moveaxis(array, info.block_axis, -1)
    return np.count_nonzero(moved.reshape(-1, m), axis=1)


@pytest.mark.parametrize("pattern", ["2:4", "4:8", "1:4"])
@pytest.mark.parametrize("fmt", ["onnx", "safetensors"])
@pytest.mark.parametrize("quantize", [False, True])
def test_nm_output_has_exactly_n_per_group_of_m(tmp_path: Path, pattern: str, fmt: str,
                                                quantize: bool) -> None:
    n, m = (int(v) for v in pattern.split(":"))
    src = SAMPLES / f"transformer.{fmt}"
    stages = [Prune(pattern=pattern)] + ([Quantize(bits=4)] if quantize else [])
    report = compress(src, tmp_path / f"o.{fmt}", Recipe(stages))
    decompress(tmp_path / f"o.{fmt}", tmp_path / f"d.{fmt}")
    original, restored = open_model(src), open_model(tmp_path / f"d.{fmt}")
    assert len(report.rows) == 9
    for row in report.rows:
        assert row.encoding.startswith(f"{pattern} sparse")
        info = original.tensors[row.name]
        counts = groups_along_input(restored.read(row.name), info, m)
        if quantize:
            # A kept weight may round to code zero, never a pruned one to nonzero.
            assert counts.max() == n and np.mean(counts == n) > 0.9, row.name
        else:
            assert counts.min() == counts.max() == n, row.name
            # The kept ones are the largest magnitudes of their group.
            w = np.moveaxis(np.abs(original.read(row.name)), info.block_axis, -1).reshape(-1, m)
            kept = np.moveaxis(restored.read(row.name) != 0, info.block_axis, -1).reshape(-1, m)
            smallest_kept = np.where(kept, w, np.inf).min(axis=1)
            largest_dropped = np.where(kept, -np.inf, w).max(axis=1)
            assert np.all(smallest_kept >= largest_dropped)


def test_nm_mask_exact_small_case() -> None:
    w = np.array([[0.1, -0.9, 0.5, 0.2, 3.0, -2.0, 1.0, 0.0]], np.float32)
    assert nm_mask(w, 2, 4, axis=1).tolist() == [[False, True, True, False,
                                                  True, True, False, False]]
    # Along axis 0 (an ONNX MatMul weight [K, N] groups along K).
    assert nm_mask(w.T, 2, 4, axis=0).T.tolist() == nm_mask(w, 2, 4, axis=1).tolist()


def test_nm_skips_a_tensor_whose_input_dimension_does_not_divide(tmp_path: Path) -> None:
    src = write_safetensors(tmp_path / "w.safetensors", {"a.weight": rng_weights(64, 70),
                                                         "b.weight": rng_weights(64, 72)})
    report = compress(src, tmp_path / "o.safetensors", Recipe([Prune(pattern="2:4"),
                                                               Quantize(bits=8)]))
    rows = {r.name: r.encoding for r in report.rows}
    assert rows == {"a.weight": "int8 ch sym", "b.weight": "2:4 sparse + int8 ch sym"}
    assert ("a.weight: prune left it as is (its input dimension (70) is not a multiple of 4, "
            "so --pattern 2:4 does not fit it)") in report.notes


def _store(tmp_path: Path, tensors: dict[str, np.ndarray]):
    return open_model(write_safetensors(tmp_path / "g.safetensors", tensors))


def test_global_threshold_matches_a_full_sort(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    tensors = {"big.weight": (rng.standard_normal((64, 128)) * 1.0).astype(np.float32),
               "small.weight": (rng.standard_normal((64, 64)) * 0.1).astype(np.float32),
               "ties.weight": np.repeat(np.float32([0.05, 0.5]), 64 * 32).reshape(64, 64)}
    store = _store(tmp_path, tensors)
    for sparsity in (0.1, 0.37, 0.5, 0.9):
        result = encode(store, Recipe([Prune(sparsity=sparsity, scope="global")]), Options())
        everything = np.concatenate([np.abs(t).reshape(-1) for t in tensors.values()])
        drop = round(sparsity * everything.size)
        zeros = sum(int((~result.tensors[n].mask).sum()) for n in tensors)
        assert zeros == drop  # exact, ties included
        threshold = np.sort(everything)[drop - 1]
        for name, array in tensors.items():
            mask = result.tensors[name].mask
            assert np.all(np.abs(array)[~mask] <= threshold)
            assert np.all(np.abs(array)[mask] >= threshold)
    # Layers with small weights lose more.
    result = encode(store, Recipe([Prune(sparsity=0.5, scope="global")]), Options())
    assert result.tensors["small.weight"].sparsity > 0.9 > 0.4 > result.tensors["big.weight"].sparsity


def test_global_threshold_of_one_tensor_is_per_tensor(tmp_path: Path) -> None:
    w = rng_weights(64, 96, seed=4)
    info = TensorInfo("w", w.shape, w.dtype, True, 0, 1)
    threshold, ties = global_threshold(lambda: iter([(info, w)]), 0.3)
    per_tensor = Prune(sparsity=0.3).apply(Dense(w), info)
    prepared = Prune(sparsity=0.3, scope="global").prepare(lambda: iter([(info, w)]))
    assert np.array_equal(prepared.apply(Dense(w), info).mask, per_tensor.mask)
    assert threshold == float(np.sort(np.abs(w).reshape(-1))[round(0.3 * w.size) - 1])


def test_global_scope_sees_tensors_after_earlier_stages(tmp_path: Path) -> None:
    # quantize -> prune global: the threshold is taken over the quantized values.
    src = matmul_model(tmp_path / "m.onnx", {"w1": rng_weights(64, 64, seed=1),
                                             "w2": 0.2 * rng_weights(64, 64, seed=2)})
    report = compress(src, tmp_path / "o.onnx",
                      Recipe([Quantize(bits=8), Prune(sparsity=0.5, scope="global")]))
    store = open_model(tmp_path / "o.onnx")
    zeros = {r.name: int((store.decode(r.name).decode() == 0).sum()) for r in report.rows}
    quantized_only = compress(src, tmp_path / "q.onnx", Recipe([Quantize(bits=8)]))
    plain = open_model(tmp_path / "q.onnx")
    zero_codes = sum(int((plain.decode(r.name).decode() == 0).sum()) for r in quantized_only.rows)
    # Exactly half of all weights are pruned; codes that were already zero may be among them.
    assert 64 * 64 <= sum(zeros.values()) <= 64 * 64 + zero_codes
    assert zeros["w2"] > 3 * zeros["w1"]


def test_prune_after_nm_is_refused(tmp_path: Path) -> None:
    w = rng_weights(8, 16)
    info = TensorInfo("w", w.shape, w.dtype, True, 0, 1)
    pruned = Prune(pattern="2:4").apply(Dense(w), info)
    assert isinstance(pruned, Sparse)
    with pytest.raises(Exception, match="use a single prune stage when it has --pattern N:M"):
        Prune(sparsity=0.3).apply(pruned, info)
