"""ONNX 8-bit kernel form: 5- to 8-bit MatMul/Gemm weights that onnxruntime runs as MatMulNBits.

Each case checks where the form is chosen, that it fuses under default
session options, that the weight onnxruntime computes with is exactly the
stored tree's decode (independent decode of the DequantizeLinear nodes, and
a run with basic optimizations only), that the table's error is the error of
the written weight, and that decompress brings back the original graph.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from modelpress import Quantize, Recipe, compress
from modelpress.core.metrics import compare
from modelpress.formats.onnx.options import OnnxTarget, OnnxWriteOptions
from modelpress.formats.onnx.sites import KERNEL8_MIN_BLOCK, KERNEL8_MIN_WEIGHTS

from conftest import matmul_model, ort_run, rng_weights
from test_onnx_forms import _decoded, _restores, _x
from test_onnx_io import dequantized, optimized_ops


def _dq_nodes(path: Path) -> dict[str, onnx.NodeProto]:
    return {n.output[0]: n for n in onnx.load(str(path)).graph.node
            if n.op_type == "DequantizeLinear"}


def _fused_close(dst: Path, x: np.ndarray, ref: np.ndarray) -> None:
    """Default options (int8 activations in the kernel) stay near the exact result."""
    fused = ort_run(dst, {"x": x})[0]
    assert np.linalg.norm(fused - ref) / np.linalg.norm(ref) < 0.02


def test_int8_auto_takes_the_kernel_on_large_matrices_only(tmp_path: Path) -> None:
    big, small = rng_weights(1024, 1024, seed=1), rng_weights(1024, 64, seed=2)
    assert big.size == KERNEL8_MIN_WEIGHTS
    src = matmul_model(tmp_path / "m.onnx", {"w1": big, "w2": small})
    dst = tmp_path / "o.onnx"
    report = compress(src, dst, Recipe([Quantize(bits=8)]))
    model = onnx.load(str(dst))
    onnx.checker.check_model(model, full_check=True)
    dq = _dq_nodes(dst)
    assert sorted(dq) == ["w1"]                   # w2 (64K weights) is folded
    # groups of 128 along K (1024 / 5 rounded up to a power of two, capped at 128),
    # symmetric: INT8 codes
    assert {a.name: a.i for a in dq["w1"].attribute} == {"axis": 0, "block_size": 128}
    codes = {t.name: t for t in model.graph.initializer}[dq["w1"].input[0]]
    assert codes.data_type == TensorProto.INT8 and list(codes.dims) == [1024, 1024]
    assert len(dq["w1"].input) == 2               # no zero point
    assert optimized_ops(dst, tmp_path) == ["MatMulNBits", "MatMul"]
    w1, w2 = _decoded(dst, "w1", "w2")
    np.testing.assert_array_equal(dequantized(dst, "w1"), w1)
    rows = {r.name: r for r in report.rows}
    assert compare(big, w1).rel_l2 == pytest.approx(rows["w1"].error.rel_l2, rel=1e-6)
    x = _x(4, 1024)
    ref = x @ w1 @ w2                             # outputs of magnitude ~1e3
    np.testing.assert_allclose(ort_run(dst, {"x": x}, exact=True)[0], ref, rtol=1e-4,
                               atol=1e-2)
    _fused_close(dst, x, ref)
    _restores(dst, tmp_path, src, ("w1", "w2"))
    # --onnx-int8 fold keeps every weight a folded chain
    compress(src, tmp_path / "f.onnx", Recipe([Quantize(bits=8)]),
             onnx_options=OnnxWriteOptions(target=OnnxTarget(int8="fold")))
    assert not _dq_nodes(tmp_path / "f.onnx")


def test_int8_auto_folds_small_blocks(tmp_path: Path) -> None:
    """Below KERNEL8_MIN_BLOCK the 8-bit kernel is not faster than float32 at 128 input rows,
    so auto folds such weights (a 6-bit head in groups of 16, say); kernel still takes them."""
    big = rng_weights(1024, 1024, seed=3)
    src = matmul_model(tmp_path / "m.onnx", {"w": big})
    for group, mode, fused in ((16, "auto", False), (32, "auto", False),
                               (KERNEL8_MIN_BLOCK, "auto", True), (16, "kernel", True)):
        dst = tmp_path / f"o{group}{mode}.onnx"
        compress(src, dst, Recipe([Quantize(bits=6, group_size=group)]),
                 onnx_options=OnnxWriteOptions(target=OnnxTarget(int8=mode)))
        assert (optimized_ops(dst, tmp_path) == ["MatMulNBits"]) is fused, (group, mode)


@pytest.mark.parametrize("scheme", ["sym", "asym"])
def test_groups_larger_than_a_kernel_block_are_split(tmp_path: Path, scheme: str) -> None:
    # K = 1000: two groups of 512 become four blocks of 256 (the last one partial).
    w = rng_weights(1000, 48, seed=3)
    src = matmul_model(tmp_path / "m.onnx", {"w": w})
    dst = tmp_path / "o.onnx"
    report = compress(src, dst, Recipe([Quantize(bits=8, group_size=512, scheme=scheme)]),
                      onnx_options=OnnxWriteOptions(target=OnnxTarget(int8="kernel")))
    onnx.checker.check_model(onnx.load(str(dst)), full_check=True)
    dq = _dq_nodes(dst)["w"]
    assert {a.name: a.i for a in dq.attribute}["block_size"] == 256
    assert len(dq.input) == (2 if scheme == "sym" else 3)
    assert optimized_ops(dst, tmp_path) == ["MatMulNBits"]
    (decoded,) = _decoded(dst, "w")
    np.testing.assert_array_equal(dequantized(dst, "w"), decoded)
    assert compare(w, decoded).rel_l2 == pytest.approx(report.rows[0].error.rel_l2, rel=1e-6)
    x = _x(3, 1000)
    np.testing.assert_allclose(ort_run(dst, {"x": x}, exact=True)[0], x @ decoded,
                               rtol=1e-4, atol=1e-4)
    _fused_close(dst, x, x @ decoded)
    _restores(dst, tmp_path, src, ("w",))


@pytest.mark.parametrize("scheme", ["asym", "sym"])
def test_six_bit_codes_are_unpacked_to_bytes_for_the_kernel(tmp_path: Path,
                                                             scheme: str) -> None:
    # 6-bit codes (the backup precision of embeddings and heads) stay 6 bits in the
    # file; a folded chain unpacks them to UINT8 (+128) for the 8-bit kernel.
    w1, w2 = rng_weights(256, 160, seed=4), rng_weights(160, 40, seed=5)
    src = matmul_model(tmp_path / "m.onnx", {"w1": w1, "w2": w2})
    dst = tmp_path / "o.onnx"
    report = compress(src, dst, Recipe([Quantize(bits=6, scheme=scheme, all_layers=True)]),
                      onnx_options=OnnxWriteOptions(target=OnnxTarget(int8="kernel")))
    model = onnx.load(str(dst))
    onnx.checker.check_model(model, full_check=True)
    inits = {t.name for t in model.graph.initializer}
    dq = _dq_nodes(dst)
    assert sorted(dq) == ["w1", "w2"]
    assert {a.name: a.i for a in dq["w1"].attribute} == {"axis": 0, "block_size": 16}
    assert all(i not in inits for i in dq["w1"].input)   # codes, scales, zero points decoded
    assert report.rows[0].bytes_after < w1.size * 6 // 8 + w1.size // 8   # codes stay 6-bit
    assert optimized_ops(dst, tmp_path) == ["MatMulNBits", "MatMulNBits"]
    d1, d2 = _decoded(dst, "w1", "w2")
    np.testing.assert_array_equal(dequantized(dst, "w1"), d1)
    rows = {r.name: r for r in report.rows}
    assert compare(w2, d2).rel_l2 == pytest.approx(rows["w2"].error.rel_l2, rel=1e-6)
    x = _x(5, 256)
    ref = x @ d1 @ d2
    np.testing.assert_allclose(ort_run(dst, {"x": x}, exact=True)[0], ref, rtol=1e-4,
                               atol=1e-4)
    _fused_close(dst, x, ref)
    _restores(dst, tmp_path, src, ("w1", "w2"))


def test_ort_target_writes_8_bit_matmulnbits(tmp_path: Path) -> None:
    w = rng_weights(300, 64, seed=6)
    src = matmul_model(tmp_path / "m.onnx", {"w": w})
    dst = tmp_path / "o.onnx"
    compress(src, dst, Recipe([Quantize(bits=8, group_size=64, scheme="asym")]),
             onnx_options=OnnxWriteOptions(target=OnnxTarget(target="ort", int8="kernel")))
    model = onnx.load(str(dst))
    (kernel,) = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    attrs = {a.name: a.i for a in kernel.attribute}
    assert attrs == {"K": 300, "N": 64, "bits": 8, "block_size": 64, "accuracy_level": 4}
    packed = {t.name: t for t in model.graph.initializer}[kernel.input[1]]
    assert list(packed.dims) == [64, 5, 64]       # [N, ceil(K / 64), 64]: one code per byte
    (decoded,) = _decoded(dst, "w")
    _fused_close(dst, _x(3, 300), _x(3, 300) @ decoded)
    _restores(dst, tmp_path, src, ("w",))
    # float activations (accuracy_level 0) make the 8-bit kernel several times slower
    compress(src, tmp_path / "f.onnx", Recipe([Quantize(bits=8, group_size=64)]),
             onnx_options=OnnxWriteOptions(target=OnnxTarget(target="ort", int8="kernel",
                                                             accuracy_level=0)))
    assert optimized_ops(tmp_path / "f.onnx", tmp_path) == ["MatMul"]


def test_gemm_head_at_backup_bits_takes_the_8_bit_kernel(tmp_path: Path) -> None:
    # int4 with the default backup precision: the head Gemm (transB=1) is 6-bit and
    # is rewritten to transB=0 on the transposed codes, like the 4-bit kernel form.
    w, bias = rng_weights(96, 256, seed=7), rng_weights(96, seed=8)
    body = rng_weights(512, 256, seed=9)      # the head holds 16% of the weights: 6 bits
    nodes = [helper.make_node("MatMul", ["x", "body"], ["h"]),
             helper.make_node("Gemm", ["h", "head", "b"], ["y"], transB=1)]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 512])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 96])],
        [onnx.numpy_helper.from_array(a, n) for a, n in ((body, "body"), (w, "head"),
                                                         (bias, "b"))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    src = tmp_path / "m.onnx"
    onnx.save(model, str(src))
    dst = tmp_path / "o.onnx"
    report = compress(src, dst, Recipe([Quantize(bits=4)]),
                      onnx_options=OnnxWriteOptions(target=OnnxTarget(int4="kernel",
                                                                      int8="kernel")))
    assert {r.name: r.encoding.split()[0] for r in report.rows} == {"body": "int4",
                                                                     "head": "int6"}
    assert optimized_ops(dst, tmp_path) == ["MatMulNBits", "MatMulNBits"]
    d_body, d_head = _decoded(dst, "body", "head")
    x = _x(3, 512)
    np.testing.assert_allclose(ort_run(dst, {"x": x}, exact=True)[0],
                               x @ d_body @ d_head.T + bias, rtol=1e-4, atol=1e-4)
    _restores(dst, tmp_path, src, ("body", "head"))
