"""The benchmark's read-back of compressed weights (benchmarks/peerbench/weights.py), on tiny models.

Each decoder is checked against what onnxruntime computes for the same model (a MatMul with an
identity input returns its weight), so the weights the benchmark compares are the weights the
runtime uses. No peer tool is needed: onnxruntime's quantize_dynamic ships with onnxruntime.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from benchmarks.peerbench.weights import (GraphIndex, decode_matmul_nbits, dequantize_linear,
                                          numpy_evaluate, payload_bytes, read_weights,
                                          weight_consumers)
from tests.conftest import matmul_model, ort_run, rng_weights

F = TensorProto.FLOAT


def _model(nodes, inits, inputs, outputs, opset=21, ms=False):
    imports = [helper.make_opsetid("", opset)]
    if ms:
        imports.append(helper.make_opsetid("com.microsoft", 1))
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=imports)
    model.ir_version = 10
    return model


def _identity_run(model: onnx.ModelProto, k: int, name: str = "x") -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    s = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return s.run(None, {name: np.eye(k, dtype=np.float32)})[0]


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack codes low-first along the last axis."""
    per = 8 // bits
    c = codes.reshape(codes.shape[:-1] + (-1, per)).astype(np.uint8)
    return np.bitwise_or.reduce(c << (np.arange(per, dtype=np.uint8) * bits), axis=-1)


@pytest.mark.parametrize("bits,with_zp", [(4, True), (4, False), (8, True)])
def test_matmul_nbits_decode_matches_onnxruntime(bits, with_zp):
    rng = np.random.default_rng(0)
    K, N, block = 80, 24, 32  # K not a multiple of the block: the last block is padded
    kb = -(-K // block)
    codes = rng.integers(0, 2 ** bits, (N, kb, block))
    b = _pack(codes, bits)
    scales = rng.uniform(0.01, 0.1, (N * kb,)).astype(np.float32)
    inputs = ["x", "B", "scales"]
    inits = [numpy_helper.from_array(b, "B"), numpy_helper.from_array(scales, "scales")]
    zp = None
    if with_zp:
        zcodes = rng.integers(0, 2 ** bits, (N, -(-kb * bits // 8) * (8 // bits)))
        zp = _pack(zcodes, bits).reshape(-1)
        inits.append(numpy_helper.from_array(zp, "zp"))
        inputs.append("zp")
    node = helper.make_node("MatMulNBits", inputs, ["y"], domain="com.microsoft", K=K, N=N,
                            bits=bits, block_size=block)
    model = _model([node], inits, [helper.make_tensor_value_info("x", F, [None, K])],
                   [helper.make_tensor_value_info("y", F, [None, N])], ms=True)
    expected = _identity_run(model, K)
    got = decode_matmul_nbits(b, scales, zp, K=K, N=N, bits=bits, block_size=block)
    assert got.shape == (K, N)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


def test_quantize_dynamic_weights_match_onnxruntime(tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    w = rng_weights(48, 40, seed=1) * 0.1
    src = matmul_model(tmp_path / "m.onnx", {"w": w})
    dst = tmp_path / "q.onnx"
    quantize_dynamic(str(src), str(dst), per_channel=True, weight_type=QuantType.QInt8)
    model = onnx.load(str(dst))
    assert "MatMulInteger" in {n.op_type for n in model.graph.node}
    consumers = weight_consumers(onnx.load(str(src)))
    read = read_weights(model, consumers)
    (key, weight), = read.weights.items()
    assert weight.form == "MatMulInteger" and weight.problem is None
    # an identity input is quantized exactly (scale 1/255), so the model returns its weights
    ran = ort_run(dst, {"x": np.eye(48, dtype=np.float32)})[0]
    np.testing.assert_allclose(weight.values, ran, rtol=1e-5, atol=1e-7)
    step = np.abs(w).max(0) / 127  # per-column symmetric int8
    assert np.all(np.abs(weight.values - w) <= step / 2 + 1e-7)
    # codes int8 [48, 40], 40 fp32 scales, 40 int8 zero points
    assert read.storage_bytes([key]) == 48 * 40 + 40 * 4 + 40


def test_modelpress_output_read_back_equals_modelpress_decode(tmp_path):
    from modelpress import Quantize, Recipe, compress
    from modelpress.formats import open_model

    src = matmul_model(tmp_path / "m.onnx", {"w1": rng_weights(64, 96, seed=2),
                                             "w2": rng_weights(96, 64, seed=3)})
    dst = tmp_path / "c.onnx"
    compress(src, dst, Recipe([Quantize(bits=4, group_size=32)]))
    consumers = weight_consumers(onnx.load(str(src)))
    read = read_weights(onnx.load(str(dst)), consumers)
    store = open_model(dst)
    decoded = {name: enc.decode() for name, _, enc, _ in store.logical_tensors() if enc is not None}
    stored = {name: nbytes for name, _, enc, nbytes in store.logical_tensors() if enc is not None}
    by_weight = {"h0": "w1", "h1": "w2"}
    for key, name in by_weight.items():
        np.testing.assert_allclose(read.weights[key].values, decoded[name], rtol=1e-6, atol=1e-8)
        assert read.weights[key].form == "computed"
        assert read.storage_bytes([key]) == stored[name]


def test_integer_table_gathered_then_dequantized():
    rng = np.random.default_rng(4)
    table = rng.integers(0, 256, (10, 6), dtype=np.uint8)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["g"]),
             helper.make_node("DequantizeLinear", ["g", "s", "z"], ["emb"])]
    inits = [numpy_helper.from_array(table, "table"),
             numpy_helper.from_array(np.array(0.05, np.float32), "s"),
             numpy_helper.from_array(np.array(128, np.uint8), "z")]
    model = _model(nodes, inits, [helper.make_tensor_value_info("ids", TensorProto.INT64, [None])],
                   [helper.make_tensor_value_info("emb", F, [None, 6])])
    read = read_weights(model, {"emb": "Gather"})
    np.testing.assert_array_equal(read.weights["emb"].values,
                                  (table.astype(np.float32) - 128) * np.float32(0.05))
    assert read.storage_bytes(["emb"]) == 60 + 4 + 1


def test_per_channel_scale_with_unit_dims_is_read_per_channel():
    # NNCF 3.4 writes Conv kernel scales as [O, 1, 1] with axis 0
    rng = np.random.default_rng(5)
    q = rng.integers(0, 256, (4, 3, 2, 2), dtype=np.uint8)
    scale = np.array([0.1, 0.2, 0.3, 0.4], np.float32).reshape(4, 1, 1)
    zp = np.array([120, 128, 130, 127], np.uint8).reshape(4, 1, 1)
    got = dequantize_linear(q, scale, zp, axis=0)
    want = (q.astype(np.float32) - zp.reshape(4, 1, 1, 1)) * scale.reshape(4, 1, 1, 1)
    np.testing.assert_array_equal(got, want)
    nodes = [helper.make_node("DequantizeLinear", ["q", "s", "z"], ["w"], axis=0),
             helper.make_node("Conv", ["x", "w"], ["y"])]
    inits = [numpy_helper.from_array(q, "q"), numpy_helper.from_array(scale, "s"),
             numpy_helper.from_array(zp, "z")]
    model = _model(nodes, inits, [helper.make_tensor_value_info("x", F, [1, 3, 5, 5])],
                   [helper.make_tensor_value_info("y", F, None)])
    np.testing.assert_array_equal(numpy_evaluate(GraphIndex(model), "w"), want)
    read = read_weights(model, {"y": "Conv"})
    np.testing.assert_array_equal(read.weights["y"].values, want)


def test_blocked_dequantize_linear_last_block_short():
    q = np.arange(10, dtype=np.int8).reshape(10, 1)
    scale = np.array([[1.0], [2.0], [3.0]], np.float32)  # blocks of 4 along axis 0: 4 + 4 + 2
    got = dequantize_linear(q, scale, None, axis=0, block_size=4)
    np.testing.assert_array_equal(got[:, 0], [0, 1, 2, 3, 8, 10, 12, 14, 24, 27])


def test_gemm_trans_b_weights_in_matmul_layout():
    w = rng_weights(5, 7, seed=6)  # Gemm transB=1: [N, K]
    node = helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)
    model = _model([node], [numpy_helper.from_array(w, "w")],
                   [helper.make_tensor_value_info("x", F, [None, 7])],
                   [helper.make_tensor_value_info("y", F, [None, 5])])
    assert weight_consumers(model) == {"y": "Gemm"}
    read = read_weights(model, {"y": "Gemm"})
    np.testing.assert_array_equal(read.weights["y"].values, w.T)


def test_activation_matmul_and_small_vectors_are_not_weights():
    nodes = [helper.make_node("MatMul", ["a", "b"], ["ab"]),
             helper.make_node("Gather", ["vec", "ids"], ["g"])]
    model = _model(nodes, [numpy_helper.from_array(np.ones(4, np.float32), "vec")],
                   [helper.make_tensor_value_info("a", F, [2, 3]),
                    helper.make_tensor_value_info("b", F, [3, 2]),
                    helper.make_tensor_value_info("ids", TensorProto.INT64, [2])],
                   [helper.make_tensor_value_info("ab", F, None),
                    helper.make_tensor_value_info("g", F, None)])
    assert weight_consumers(model) == {}


def test_missing_consumer_is_a_problem_not_a_crash():
    model = _model([helper.make_node("Identity", ["x"], ["z"])], [],
                   [helper.make_tensor_value_info("x", F, [2])],
                   [helper.make_tensor_value_info("z", F, [2])])
    read = read_weights(model, {"y": "MatMul"})
    assert read.weights["y"].values is None
    assert "no node produces 'y'" in read.weights["y"].problem


def test_payload_bytes_counts_packed_and_typed_data():
    int4 = helper.make_tensor("a", TensorProto.INT4, [3, 5], np.zeros(15, np.int8))
    assert payload_bytes(int4) == 8
    raw = numpy_helper.from_array(np.zeros((4, 4), np.float16), "b")
    assert payload_bytes(raw) == 32
    typed = helper.make_tensor("c", F, [2, 3], [0.0] * 6)
    assert payload_bytes(typed) == 24
