"""cluster: k-means correctness, codebook sizes, determinism, and the folded ONNX chain."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from modelpress import (Cluster, Dense, Options, Palettized, Prune, Recipe, Sparse, TensorInfo, compare, compress, decompress)
from modelpress.core.kmeans import kmeans_rows
from modelpress.formats import open_model

from conftest import SAMPLES, matmul_model, ort_run, rng_weights, sha256

INFO = TensorInfo("w", (48, 200), np.dtype(np.float32), True, 0, 1)


def test_kmeans_reaches_a_lloyd_fixed_point() -> None:
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.standard_normal(3000), rng.standard_normal(500) * 0.1,
                             rng.standard_normal(700) + 5, np.zeros(50)]).astype(np.float32)
    rows = np.repeat([0, 1], [2100, 2150])
    centroids, index = kmeans_rows(values, rows, 2, 8)
    assert centroids.shape == (2, 8) and np.all(np.diff(centroids, axis=1) >= 0)
    for r in range(2):
        v, i = values[rows == r].astype(np.float64), index[rows == r]
        c = centroids[r]
        # Every value sits with its nearest centroid (ties within float32 rounding) ...
        distance = np.abs(v[:, None] - c[None, :])
        assert np.all(distance[np.arange(v.size), i] <= distance.min(axis=1) + 1e-6)
        # ... and every centroid is the mean of its values.
        for j in np.unique(i):
            assert c[j] == pytest.approx(v[i == j].mean(), rel=1e-9, abs=1e-12)


def test_kmeans_is_at_least_as_good_as_uniform_levels() -> None:
    w = rng_weights(64, 256, seed=5)
    pal = Cluster(bits=4).apply(Dense(w), INFO)
    span = np.linspace(w.min(), w.max(), 16)
    uniform = span[np.abs(w[..., None] - span).argmin(axis=-1)]
    assert compare(w, pal.decode()).sqnr_db > compare(w, uniform).sqnr_db + 1.0


@pytest.mark.parametrize("per_channel", [False, True])
def test_four_bits_leave_at_most_16_values_per_codebook(per_channel: bool) -> None:
    w = rng_weights(48, 200, seed=1)
    out = Cluster(bits=4, per_channel=per_channel).apply(Dense(w), INFO)
    assert isinstance(out, Palettized) and out.bits == 4
    decoded = out.decode()
    groups = decoded if per_channel else decoded.reshape(1, -1)
    assert max(len(np.unique(row)) for row in groups) <= 16
    assert out.lut.shape == ((48, 16) if per_channel else (1, 16))
    assert out.nbytes == 48 * 200 // 2 + out.lut.nbytes
    assert out.describe() == ("palette 16 ch (4-bit)" if per_channel else "palette 16 (4-bit)")


def test_clusters_not_a_power_of_two() -> None:
    w = rng_weights(48, 200, seed=2)
    out = Cluster(clusters=10).apply(Dense(w), INFO)
    assert len(np.unique(out.decode())) == 10 and out.bits == 4


def test_prune_then_cluster_keeps_an_exact_zero_entry() -> None:
    w = rng_weights(48, 200, seed=3)
    pruned = Prune(sparsity=0.5).apply(Dense(w), INFO)
    for per_channel in (False, True):
        out = Cluster(bits=4, per_channel=per_channel).apply(pruned, INFO)
        assert isinstance(out, Sparse) and isinstance(out.values, Palettized)
        assert out.values.zero_index == 0 and np.all(out.values.lut[:, 0] == 0)
        decoded = out.decode()
        np.testing.assert_array_equal(decoded == 0, ~pruned.mask)
        np.testing.assert_array_equal(out.values.decode(), decoded)  # zeros without the mask too
        groups = decoded if per_channel else decoded.reshape(1, -1)
        assert max(len(np.unique(row)) for row in groups) <= 16


@pytest.mark.parametrize("fmt", ["onnx", "safetensors"])
def test_cluster_output_is_byte_for_byte_deterministic(tmp_path: Path, fmt: str) -> None:
    src = SAMPLES / f"transformer.{fmt}"
    recipe = Recipe([Cluster(bits=4, per_channel=True)])
    compress(src, tmp_path / f"a.{fmt}", recipe)
    compress(src, tmp_path / f"b.{fmt}", recipe)
    assert sha256(tmp_path / f"a.{fmt}") == sha256(tmp_path / f"b.{fmt}")
    store = open_model(tmp_path / f"a.{fmt}")
    original = open_model(src)
    for name, info in original.tensors.items():
        if info.default_target(4096):
            tree = store.decode(name)
            rows = tree.rows(tree.decode())
            assert max(len(np.unique(r)) for r in rows) <= 16, name


def optimized_graph(path: Path, tmp_path: Path) -> onnx.ModelProto:
    """The graph onnxruntime runs after its load-time optimizations."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return onnx.load(str(tmp_path / "optimized.onnx"))


@pytest.mark.parametrize("stage", [Cluster(bits=4), Cluster(bits=3, per_channel=True),
                                   Cluster(bits=8), Cluster(bits=1, per_channel=True),
                                   Cluster(clusters=40)])
def test_onnx_unpack_chain_decodes_exactly_and_is_folded_at_load(tmp_path: Path,
                                                                 stage: Cluster) -> None:
    w1, w2 = rng_weights(64, 96, seed=1), rng_weights(96, 80, seed=2)
    src = matmul_model(tmp_path / "m.onnx", {"w1": w1, "w2": w2})
    report = compress(src, tmp_path / "o.onnx", Recipe([stage]))
    model = onnx.load(str(tmp_path / "o.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert "DequantizeLinear" not in {n.op_type for n in model.graph.node}
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    store = open_model(tmp_path / "o.onnx")
    approx = [store.decode(n).decode() for n in ("w1", "w2")]
    np.testing.assert_allclose(ort_run(tmp_path / "o.onnx", {"x": x})[0], x @ approx[0] @ approx[1],
                               rtol=1e-4, atol=1e-4)
    row = next(r for r in report.rows if r.name == "w1")
    assert compare(w1, approx[0]).rel_l2 == pytest.approx(row.error.rel_l2, rel=1e-6)
    bits = stage.bits or 6
    assert row.bytes_after >= -(-64 * 96 * bits // 8)
    assert row.bytes_after <= -(-64 * 96 * bits // 8) + approx[0].size // 10 + 4 * 96 * 2 ** bits
    # onnxruntime folds the whole decode chain into a constant: only the MatMuls remain.
    ops = [n.op_type for n in optimized_graph(tmp_path / "o.onnx", tmp_path).graph.node]
    assert ops == ["MatMul", "MatMul"]


def test_safetensors_codebook_and_packed_indices(tmp_path: Path) -> None:
    report = compress(SAMPLES / "mlp.safetensors", tmp_path / "o.safetensors",
                      Recipe([Prune(sparsity=0.75), Cluster(bits=4)]), Options(min_elements=1000))
    store = open_model(tmp_path / "o.safetensors")
    parts = {n: (i.dtype, i.shape) for n, i in store.tensors.items() if n.startswith("fc2.weight")}
    n = 128 * 256
    assert parts == {"fc2.weight.mp_mask": (np.dtype(np.uint8), (n // 8,)),
                     "fc2.weight.mp_lut": (np.dtype(np.float32), (1, 16)),
                     "fc2.weight.mp_indices": (np.dtype(np.uint8), (n // 4 // 2,))}
    decompress(tmp_path / "o.safetensors", tmp_path / "d.safetensors")
    restored, original = open_model(tmp_path / "d.safetensors"), open_model(SAMPLES / "mlp.safetensors")
    for row in report.rows:
        values = restored.read(row.name)
        assert np.mean(values == 0) == pytest.approx(0.75, abs=1e-3)
        assert len(np.unique(values)) <= 16
        assert compare(original.read(row.name), values).rel_l2 == pytest.approx(row.error.rel_l2,
                                                                                rel=1e-6)
