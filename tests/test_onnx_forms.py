"""ONNX forms of quantized weights: the 4-bit kernel forms, the folded chains, and their limits.

Each form must run in onnxruntime, decode to exactly what the stored tree
decodes to, fold or fuse as intended under default session options (checked
on the optimized model onnxruntime writes), and come back with decompress.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from modelpress import Quantize, Recipe, compress, decompress
from modelpress.formats.onnx.options import OnnxTarget, OnnxWriteOptions
from modelpress.formats import open_model

from conftest import matmul_model, ort_run, rng_weights
from test_onnx_io import dequantized, optimized_ops

FOUR = Recipe([Quantize(bits=4, all_layers=True)])


def _x(rows: int, cols: int) -> np.ndarray:
    return np.random.default_rng(7).standard_normal((rows, cols)).astype(np.float32)


def _decoded(path: Path, *names: str) -> list[np.ndarray]:
    store = open_model(path)
    return [store.decode(n).decode() for n in names]


def _restores(dst: Path, tmp_path: Path, src: Path, names: tuple[str, ...]) -> None:
    """decompress puts back the original graph with the decoded weights."""
    dense = tmp_path / "dense.onnx"
    decompress(dst, dense)
    back, original = onnx.load(str(dense)), onnx.load(str(src))
    assert [(n.op_type, list(n.input)) for n in back.graph.node] == \
        [(n.op_type, list(n.input)) for n in original.graph.node]
    assert not back.functions
    values = {t.name: numpy_helper.to_array(t) for t in back.graph.initializer}
    for name, expected in zip(names, _decoded(dst, *names)):
        np.testing.assert_array_equal(values[name], expected)


def test_kernel_form_is_blocked_dequantize_linear_fused_into_matmulnbits(tmp_path: Path) -> None:
    src = matmul_model(tmp_path / "m.onnx", {"w1": rng_weights(256, 96, seed=1),
                                             "w2": rng_weights(96, 48, seed=2)})
    dst = tmp_path / "o.onnx"
    compress(src, dst, FOUR, onnx_options=OnnxWriteOptions(target=OnnxTarget(int4="kernel")))
    model = onnx.load(str(dst))
    onnx.checker.check_model(model, full_check=True)
    assert [o.version for o in model.opset_import if o.domain == ""] == [21]
    dq = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    assert sorted(dq) == ["w1", "w2"]
    assert {a.name: a.i for a in dq["w1"].attribute} == {"axis": 0, "block_size": 16}
    inits = {t.name: t for t in model.graph.initializer}
    codes = inits[dq["w1"].input[0]]
    assert codes.data_type == TensorProto.UINT4 and list(codes.dims) == [256, 96]
    # Scales and zero points come from a decode call onnxruntime folds at load.
    assert all(i not in inits for i in dq["w1"].input[1:])
    w1, w2 = _decoded(dst, "w1", "w2")
    np.testing.assert_array_equal(dequantized(dst, "w1"), w1)
    ops = optimized_ops(dst, tmp_path)
    assert ops == ["MatMulNBits", "MatMulNBits"]
    x = _x(5, 256)
    exact = ort_run(dst, {"x": x}, exact=True)[0]
    np.testing.assert_allclose(exact, x @ w1 @ w2, rtol=1e-4, atol=1e-4)
    fused = ort_run(dst, {"x": x})[0]   # accuracy level 4: int8 activations
    assert np.linalg.norm(fused - exact) / np.linalg.norm(exact) < 0.02
    _restores(dst, tmp_path, src, ("w1", "w2"))


@pytest.mark.parametrize("level", [0, 4])
def test_ort_target_writes_matmulnbits(tmp_path: Path, level: int) -> None:
    src = matmul_model(tmp_path / "m.onnx", {"w1": rng_weights(200, 96, seed=1),
                                             "w2": rng_weights(96, 48, seed=2)})
    dst = tmp_path / "o.onnx"
    compress(src, dst, FOUR,
             onnx_options=OnnxWriteOptions(target=OnnxTarget(target="ort", int4="kernel",
                                                             accuracy_level=level)))
    model = onnx.load(str(dst))
    kernels = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert [n.domain for n in kernels] == ["com.microsoft"] * 2
    attrs = {a.name: a.i for a in kernels[0].attribute}
    assert attrs == {"K": 200, "N": 96, "bits": 4, "block_size": 16, "accuracy_level": level}
    packed = {t.name: t for t in model.graph.initializer}[kernels[0].input[1]]
    assert list(packed.dims) == [96, 13, 8]     # [N, ceil(K / 16), 16 / 2]
    assert "MatMul" not in [n.op_type for n in model.graph.node]
    w1, w2 = _decoded(dst, "w1", "w2")
    x = _x(3, 200)
    got = ort_run(dst, {"x": x})[0]
    ref = x @ w1 @ w2
    if level == 0:
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)
    else:
        assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.02
    assert optimized_ops(dst, tmp_path) == ["MatMulNBits", "MatMulNBits"]
    _restores(dst, tmp_path, src, ("w1", "w2"))


def _gemm_model(path: Path, w: np.ndarray, bias: np.ndarray, after: str | None) -> Path:
    """x -> Gemm(W [N, K], transB=1, bias) [-> after] -> y."""
    nodes = [helper.make_node("Gemm", ["x", "w", "b"], ["g"], transB=1)]
    out = "g"
    if after:
        nodes.append(helper.make_node(after, ["g"], ["r"]))
        nodes.append(helper.make_node("Neg", ["r"], ["y"]))
        out = "y"
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", w.shape[1]])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["b", w.shape[0]])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(bias, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_gemm_trans_b_is_rewritten_for_the_kernel(tmp_path: Path) -> None:
    w, bias = rng_weights(64, 160, seed=3), rng_weights(64, seed=4)
    src = _gemm_model(tmp_path / "m.onnx", w, bias, None)
    dst = tmp_path / "o.onnx"
    compress(src, dst, FOUR, onnx_options=OnnxWriteOptions(target=OnnxTarget(int4="kernel")))
    model = onnx.load(str(dst))
    gemm = next(n for n in model.graph.node if n.op_type == "Gemm")
    assert {a.name: a.i for a in gemm.attribute}.get("transB", 0) == 0
    assert optimized_ops(dst, tmp_path) == ["MatMulNBits"]
    (decoded,) = _decoded(dst, "w")
    assert decoded.shape == (64, 160)
    x = _x(4, 160)
    np.testing.assert_allclose(ort_run(dst, {"x": x}, exact=True)[0], x @ decoded.T + bias,
                               rtol=1e-4, atol=1e-4)
    _restores(dst, tmp_path, src, ("w",))


@pytest.mark.parametrize("after", ["Relu", "Clip"])
def test_relu_consumer_gets_the_folded_chain(tmp_path: Path, after: str) -> None:
    # onnxruntime's QDQ selector leaves DequantizeLinear running at every call when the
    # MatMul/Gemm's only consumer is an inner Relu/Clip; the folded chain avoids that.
    w, bias = rng_weights(64, 160, seed=3), rng_weights(64, seed=4)
    src = _gemm_model(tmp_path / "m.onnx", w, bias, after)
    dst = tmp_path / "o.onnx"
    compress(src, dst, FOUR, onnx_options=OnnxWriteOptions(target=OnnxTarget(int4="kernel")))
    assert "DequantizeLinear" not in [n.op_type for n in onnx.load(str(dst)).graph.node]
    ops = optimized_ops(dst, tmp_path)
    assert "DequantizeLinear" not in ops and "MatMulNBits" not in ops
    # With --onnx-target ort the kernel is written directly, Relu or not.
    compress(src, tmp_path / "k.onnx", FOUR,
             onnx_options=OnnxWriteOptions(target=OnnxTarget(target="ort", int4="kernel")))
    assert "MatMulNBits" in optimized_ops(tmp_path / "k.onnx", tmp_path)


def test_shared_weight_gets_the_folded_chain(tmp_path: Path) -> None:
    # One dequantized weight with two consumers is not fused (it would run at every call).
    w = rng_weights(128, 128, seed=5)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["a"]), helper.make_node("MatMul", ["a", "w"],
                                                                         ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 128])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 128])],
        [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "m.onnx"))
    dst = tmp_path / "o.onnx"
    compress(tmp_path / "m.onnx", dst, FOUR,
             onnx_options=OnnxWriteOptions(target=OnnxTarget(int4="kernel")))
    assert optimized_ops(dst, tmp_path) == ["MatMul", "MatMul"]
    (decoded,) = _decoded(dst, "w")
    x = _x(2, 128)
    np.testing.assert_allclose(ort_run(dst, {"x": x})[0], x @ decoded @ decoded, rtol=1e-4,
                               atol=1e-3)


def test_auto_keeps_small_matrices_folded(tmp_path: Path) -> None:
    src = matmul_model(tmp_path / "m.onnx", {"w1": rng_weights(256, 96, seed=1)})
    compress(src, tmp_path / "o.onnx", FOUR)
    assert optimized_ops(tmp_path / "o.onnx", tmp_path) == ["MatMul"]


@pytest.mark.parametrize("bits", [8, 4])
def test_conv_weights_fold_at_load(tmp_path: Path, samples: Path, bits: int) -> None:
    dst = tmp_path / "c.onnx"
    compress(samples / "cnn.onnx", dst, Recipe([Quantize(bits=bits, all_layers=True)]),
             onnx_options=OnnxWriteOptions(target=OnnxTarget(int4="kernel")))
    ops = optimized_ops(dst, tmp_path)
    before = optimized_ops(samples / "cnn.onnx", tmp_path)
    assert ops == before   # the same graph as the original's: every chain was folded
    store = open_model(dst)
    assert "conv2.weight" in store.encodings
    np.testing.assert_array_equal(dequantized(dst, "conv2.weight"),
                                  store.decode("conv2.weight").decode())


def test_pruned_and_quantized_kernel_form_keeps_exact_zeros(tmp_path: Path) -> None:
    from modelpress import Prune
    src = matmul_model(tmp_path / "m.onnx", {"w1": rng_weights(128, 64, seed=8)})
    dst = tmp_path / "o.onnx"
    compress(src, dst, Recipe([Prune(pattern="2:4"), Quantize(bits=4, all_layers=True)]),
             onnx_options=OnnxWriteOptions(target=OnnxTarget(int4="kernel")))
    assert optimized_ops(dst, tmp_path) == ["MatMulNBits"]
    (decoded,) = _decoded(dst, "w1")
    assert int((decoded == 0).sum()) >= decoded.size // 2
    np.testing.assert_array_equal(dequantized(dst, "w1"), decoded)
    x = _x(3, 128)
    np.testing.assert_allclose(ort_run(dst, {"x": x}, exact=True)[0], x @ decoded, rtol=1e-4,
                               atol=1e-4)
    _restores(dst, tmp_path, src, ("w1",))


def test_opset_raised_after_a_decode_function_keeps_it(tmp_path: Path) -> None:
    # w1 (first in the file) becomes an int8 decode chain, a model-local function at
    # opset 18; w2's 4-bit kernel form then needs opset 21, raised while streaming.
    # onnx's version converter drops model-local functions: they must be carried over.
    src = matmul_model(tmp_path / "m.onnx", {"w1": rng_weights(256, 96, seed=1),
                                             "w2": rng_weights(96, 48, seed=2)})
    dst = tmp_path / "o.onnx"
    recipe = Recipe([Quantize(bits=8, include=("w1",)),
                     Quantize(bits=4, include=("w2",), all_layers=True)])
    report = compress(src, dst, recipe,
                      onnx_options=OnnxWriteOptions(target=OnnxTarget(int4="kernel")))
    assert "ONNX opset raised from 18 to 21" in " ".join(report.notes)
    model = onnx.load(str(dst))
    onnx.checker.check_model(model, full_check=True)
    assert [o.version for o in model.opset_import if o.domain == ""] == [21]
    assert model.functions and all(
        o.version == 21 for f in model.functions for o in f.opset_import if o.domain == "")
    called = {n.op_type for n in model.graph.node if n.domain == "modelpress"}
    assert called == {f.name for f in model.functions}
    w1, w2 = _decoded(dst, "w1", "w2")
    x = _x(5, 256)
    exact = ort_run(dst, {"x": x}, exact=True)[0]
    np.testing.assert_allclose(exact, x @ w1 @ w2, rtol=1e-4, atol=1e-4)
    _restores(dst, tmp_path, src, ("w1", "w2"))
