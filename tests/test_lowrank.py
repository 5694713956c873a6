"""lowrank: truncated SVD, rank choice, skipping, and the rewritten ONNX consumers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from modelpress import (Dense, Factorize, LowRank, Options, Quantize, Recipe, TensorInfo, compare, compress, decompress)
from modelpress.core.svd import rank_for_energy, truncated_svd
from modelpress.formats import open_model

from conftest import SAMPLES, matmul_model, ort_run, rng_weights


def decaying(m: int, n: int, seed: int = 0, power: float = 1.0) -> np.ndarray:
    """A matrix whose singular values fall like 1 / i**power, as trained weights' do."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.standard_normal((m, min(m, n))))
    v, _ = np.linalg.qr(rng.standard_normal((n, min(m, n))))
    s = 1.0 / np.arange(1, min(m, n) + 1) ** power
    return ((u * s) @ v.T).astype(np.float32)


def test_randomized_svd_is_near_optimal_and_repeatable() -> None:
    a = decaying(300, 200)
    rank = 20
    s_all = np.linalg.svd(a.astype(np.float64), compute_uv=False)
    optimal = np.sqrt(np.sum(s_all[rank:] ** 2)) / np.linalg.norm(a)
    u, s, vt = truncated_svd(a, rank, method="randomized")
    error = np.linalg.norm(a - (u * s) @ vt) / np.linalg.norm(a)
    assert optimal <= error <= 1.01 * optimal
    again = truncated_svd(a, rank, method="randomized")
    assert all(x.tobytes() == y.tobytes() for x, y in zip((u, s, vt), again))
    full = truncated_svd(a, rank, method="full")
    # The leading singular vectors agree with LAPACK's (trailing ones converge last).
    np.testing.assert_allclose(np.abs(full[0].T @ u).diagonal()[:10], 1.0, atol=1e-3)


def test_rank_for_energy() -> None:
    s = np.array([3.0, 2.0, 1.0, 0.0])
    assert rank_for_energy(s, 9 / 14) == 1
    assert rank_for_energy(s, 9 / 14 + 1e-6) == 2
    assert rank_for_energy(s, 1.0) == 3


INFO = TensorInfo("w", (64, 256), np.dtype(np.float32), True, 1, 0)


@pytest.mark.parametrize("stage, rank", [(Factorize(rank_ratio=0.25), 16), (Factorize(rank=5), 5),
                                         (Factorize(energy=0.5), None)])
def test_rank_choice_and_factor_shapes(stage: Factorize, rank: int | None) -> None:
    w = decaying(64, 256, power=0.5)
    out = stage.apply(Dense(w), INFO)
    assert isinstance(out, LowRank)
    if rank is None:  # energy: the smallest rank that holds half the squared singular values
        s = np.linalg.svd(w.astype(np.float64), compute_uv=False)
        rank = int(np.searchsorted(np.cumsum(s ** 2) / np.sum(s ** 2), 0.5) + 1)
    assert out.left.shape == (64, rank) and out.right.shape == (rank, 256)
    assert out.nbytes == rank * (64 + 256) * 4 and out.describe() == f"rank {rank}"
    s = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    optimal = np.sqrt(np.sum(s[rank:] ** 2) / np.sum(s ** 2))
    assert compare(w, out.decode()).rel_l2 == pytest.approx(optimal, rel=1e-3, abs=1e-6)


def test_tensor_that_would_not_shrink_is_left_alone_with_a_note(tmp_path: Path) -> None:
    src = matmul_model(tmp_path / "m.onnx", {"a": rng_weights(64, 64, seed=1),
                                             "b": rng_weights(64, 256, seed=2)})
    report = compress(src, tmp_path / "o.onnx", Recipe([Factorize(rank=33), Quantize(bits=8)]))
    encodings = {r.name: r.encoding for r in report.rows}
    # The 64x33 left factor is small next to the model's mean weight: its 8-bit groups,
    # chosen from its values, are the shortest (grouping.choose_group).
    assert encodings == {"a": "int8 g16 sym s8", "b": "rank 33 + int8 g4 sym s8"}
    assert ("a: lowrank left it as is (rank 33 factors (4,224 values) would not be smaller than "
            "the 64x64 matrix (4,096 values))") in report.notes


def _ops(path: Path) -> list[tuple[str, list[str]]]:
    return [(n.op_type, list(n.input)) for n in onnx.load(str(path)).graph.node]


def test_matmul_weight_is_rewritten_shrinks_and_runs(tmp_path: Path) -> None:
    w1, w2 = decaying(64, 96, seed=1), rng_weights(96, 80, seed=2)
    src = matmul_model(tmp_path / "m.onnx", {"w1": w1, "w2": w2})
    report = compress(src, tmp_path / "o.onnx", Recipe([Factorize(rank_ratio=0.25)]))
    row = next(r for r in report.rows if r.name == "w1")
    assert row.bytes_after == 16 * (64 + 96) * 4 < row.bytes_before == w1.nbytes
    model = onnx.load(str(tmp_path / "o.onnx"))
    onnx.checker.check_model(model, full_check=True)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert "w1" not in inits and "w2" not in inits
    assert _ops(tmp_path / "o.onnx") == [
        ("MatMul", ["x", "w1_lowrank_left"]), ("MatMul", ["w1_lowrank_mid", "w1_lowrank_right"]),
        ("MatMul", ["h0", "w2_lowrank_left"]), ("MatMul", ["w2_lowrank_mid", "w2_lowrank_right"])]
    u, v = inits["w1_lowrank_left"], inits["w1_lowrank_right"]
    assert compare(w1, u @ v).rel_l2 == pytest.approx(row.error.rel_l2, rel=1e-5)
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    out = ort_run(tmp_path / "o.onnx", {"x": x})[0]
    expected = x @ u @ v @ inits["w2_lowrank_left"] @ inits["w2_lowrank_right"]
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
    # decompress puts the original graph back, with W = U @ V as its initializer
    decompress(tmp_path / "o.onnx", tmp_path / "d.onnx")
    assert _ops(tmp_path / "d.onnx") == _ops(src)
    np.testing.assert_allclose(ort_run(tmp_path / "d.onnx", {"x": x})[0], out, rtol=1e-4,
                               atol=1e-4)


def _gemm_model(path: Path, w: np.ndarray, trans_a: int, trans_b: int, bias: bool,
                alpha: float, beta: float) -> Path:
    k = w.shape[1] if trans_b else w.shape[0]
    n = w.shape[0] if trans_b else w.shape[1]
    a_shape = [k, 5] if trans_a else [5, k]
    inputs = ["a", "w"] + (["c"] if bias else [])
    inits = [numpy_helper.from_array(w, "w")]
    if bias:
        inits.append(numpy_helper.from_array(rng_weights(n, seed=9), "c"))
    node = helper.make_node("Gemm", inputs, ["y"], transA=trans_a, transB=trans_b, alpha=alpha,
                            beta=beta)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("a", TensorProto.FLOAT,
                                                                          a_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [5, n])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.mark.parametrize("trans_a, trans_b, bias, alpha, beta", [
    (0, 1, True, 1.0, 1.0), (0, 0, True, 0.5, 2.0), (1, 1, False, 1.5, 1.0), (1, 0, True, 1.0, 0.3)])
def test_gemm_rewrite_respects_transposes_bias_alpha_beta(tmp_path: Path, trans_a: int,
                                                          trans_b: int, bias: bool, alpha: float,
                                                          beta: float) -> None:
    w = decaying(96, 80, seed=3)
    src = _gemm_model(tmp_path / "g.onnx", w, trans_a, trans_b, bias, alpha, beta)
    compress(src, tmp_path / "o.onnx", Recipe([Factorize(rank=8)]))
    onnx.checker.check_model(str(tmp_path / "o.onnx"), full_check=True)
    ops = _ops(tmp_path / "o.onnx")
    assert [op for op, _ in ops] == ["Gemm", "Gemm"] and all("w" not in i for _, i in ops)
    x_shape = (w.shape[1] if trans_b else w.shape[0], 5) if trans_a else \
        (5, w.shape[1] if trans_b else w.shape[0])
    a = np.random.default_rng(1).standard_normal(x_shape).astype(np.float32)
    approx = open_model(tmp_path / "o.onnx").decode("w").decode()
    a2 = a.T if trans_a else a
    expected = alpha * a2 @ (approx.T if trans_b else approx)
    if bias:
        expected += beta * rng_weights(w.shape[0] if trans_b else w.shape[1], seed=9)
    np.testing.assert_allclose(ort_run(tmp_path / "o.onnx", {"a": a})[0], expected, rtol=1e-4,
                               atol=1e-4)


def test_weight_with_two_consumers_is_made_by_a_matmul_node(tmp_path: Path) -> None:
    w = decaying(64, 64, seed=4)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("MatMul", ["h", "w"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                         [2, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 64])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "m.onnx"))
    report = compress(tmp_path / "m.onnx", tmp_path / "o.onnx", Recipe([Factorize(rank=8)]))
    assert any("low-rank factors are multiplied back into the weight by a MatMul node" in n
               for n in report.notes)
    ops = _ops(tmp_path / "o.onnx")
    assert ops[0] == ("MatMul", ["w_lowrank_left", "w_lowrank_right"])
    approx = open_model(tmp_path / "o.onnx").decode("w").decode()
    x = np.random.default_rng(2).standard_normal((2, 64)).astype(np.float32)
    np.testing.assert_allclose(ort_run(tmp_path / "o.onnx", {"x": x})[0], x @ approx @ approx,
                               rtol=1e-4, atol=1e-4)
    decompress(tmp_path / "o.onnx", tmp_path / "d.onnx")
    assert _ops(tmp_path / "d.onnx") == _ops(tmp_path / "m.onnx")
    np.testing.assert_allclose(ort_run(tmp_path / "d.onnx", {"x": x})[0], x @ approx @ approx,
                               rtol=1e-4, atol=1e-4)


def test_lowrank_then_quantize_dequantizes_each_factor(tmp_path: Path) -> None:
    report = compress(SAMPLES / "transformer.onnx", tmp_path / "o.onnx",
                      Recipe([Factorize(rank_ratio=0.25), Quantize(bits=4, group_size=16)]))
    model = onnx.load(str(tmp_path / "o.onnx"))
    decoded = {n.output[0] for n in model.graph.node if n.domain == "modelpress"}
    assert {"layers.0.attn.q_proj.weight_lowrank_left",
            "layers.0.attn.q_proj.weight_lowrank_right"} <= decoded
    row = next(r for r in report.rows if r.name == "layers.0.attn.q_proj.weight")
    assert row.encoding == "rank 16 + int4 g16 asym s5 z2"
    # 4-bit codes of both factors; per factor 64 groups of 7 bits (5-bit scale code, 2-bit
    # zero point) and the scale grid's two tables (8 + 4 float32)
    assert row.bytes_after == (64 * 16 + 16 * 64) // 2 + 2 * (64 * 7 // 8 + 12 * 4)
    ids = np.arange(16, dtype=np.int64).reshape(1, 16)
    assert np.isfinite(ort_run(tmp_path / "o.onnx", {"input_ids": ids})[0]).all()


def test_safetensors_factors_round_trip(tmp_path: Path) -> None:
    report = compress(SAMPLES / "mlp.safetensors", tmp_path / "o.safetensors",
                      Recipe([Factorize(rank_ratio=0.25), Quantize(bits=3)]),
                      Options(min_elements=1000))
    store = open_model(tmp_path / "o.safetensors")
    assert {"fc1.weight.mp_left_codes", "fc1.weight.mp_right_scale"} <= set(store.tensors)
    tree = store.decode("fc1.weight")
    assert isinstance(tree, LowRank) and tree.describe() == "rank 16 + int3 g128 sym"
    original = open_model(SAMPLES / "mlp.safetensors")
    for row in report.rows:
        assert compare(original.read(row.name), store.decode(row.name).decode()).rel_l2 == \
            pytest.approx(row.error.rel_l2, rel=1e-6)
