"""ONNX: which tensors are weights, the written DequantizeLinear forms, and that they run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from modelpress import Cast, Cluster, Factorize, Prune, Quantize, Recipe, compare, compress
from modelpress.formats.onnx.options import OnnxTarget, OnnxWriteOptions
from modelpress.core.errors import ModelWriteError
from modelpress.formats import open_model

from conftest import matmul_model, ort_run, rng_weights


def dequantized(model_path: Path, name: str) -> np.ndarray:
    """Run just the nodes that produce `name` in onnxruntime: an independent decode."""
    model = onnx.load(str(model_path))
    producer = {out: n for n in model.graph.node for out in n.output}
    inits = {t.name: t for t in model.graph.initializer}
    nodes, pending = [], [name]
    while pending:
        node = producer.get(pending.pop())
        if node is not None and node not in nodes:
            nodes.insert(0, node)
            pending += [i for i in node.input if i and i not in inits]
    used = {i for n in nodes for i in n.input}
    graph = helper.make_graph(nodes, "dq", [], [helper.make_tensor_value_info(
        name, TensorProto.FLOAT, None)], [t for n, t in inits.items() if n in used])
    mini = helper.make_model(graph, opset_imports=model.opset_import, functions=model.functions)
    mini.ir_version = model.ir_version
    path = model_path.with_suffix(".dq.onnx")
    onnx.save(mini, str(path))
    return ort_run(path, {})[0]


def optimized_ops(path: Path, tmp_path: Path) -> list[str]:
    """Op types left after onnxruntime's load-time optimizations (default session options)."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]


def initializer(model_path: Path, name: str) -> np.ndarray:
    model = onnx.load(str(model_path))
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


def test_weight_roles_of_sample_transformer(samples: Path) -> None:
    store = open_model(samples / "transformer.onnx")
    roles = {n: (i.role, i.channel_axis, i.block_axis) for n, i in store.tensors.items() if i.weight_like}
    assert roles["embed_tokens.weight"] == ("Gather", 0, 1)
    assert roles["layers.0.attn.q_proj.weight"] == ("MatMul", 1, 0)
    assert roles["layers.0.attn.o_proj.weight"] == ("Gemm", 0, 1)  # transB=1
    assert roles["lm_head.weight"] == ("MatMul", 1, 0)
    assert not store.tensors["layers.0.ln1.weight"].weight_like
    assert not store.tensors["layers.0.attn.q_proj.bias"].weight_like


def test_cnn_conv_weights_are_candidates(samples: Path) -> None:
    store = open_model(samples / "cnn.onnx")
    conv = store.tensors["conv2.weight"]
    assert (conv.role, conv.channel_axis, conv.block_axis) == ("Conv", 0, 1)


@pytest.mark.parametrize("recipe, kind, stored", [
    ([Quantize(bits=8)], "Int8SymS8Group", TensorProto.INT8),
    ([Quantize(bits=8, scheme="asym")], "Int8AsymZ8S8Group", TensorProto.INT8),
    ([Quantize(bits=8, granularity="channel", scale_bits=0)], "Int8SymChannel",
     TensorProto.INT8),
    ([Quantize(bits=4, all_layers=True)], "Int4AsymZ2S5Group", TensorProto.UINT8),
    ([Quantize(bits=4, group_size=16, scheme="sym", scale_bits=0, all_layers=True)], "Int4SymGroup",
     TensorProto.UINT8),
    ([Quantize(bits=3, group_size=32, scheme="asym", all_layers=True)], "Int3AsymZ3S8Group", TensorProto.UINT8),
    ([Quantize(bits=2, group_size=16, all_layers=True)], "Int2AsymZ2S5Group", TensorProto.UINT8),
])
def test_small_matmul_weights_become_folded_chains(tmp_path: Path, recipe, kind: str,
                                                   stored: int) -> None:
    w1, w2 = rng_weights(64, 96, seed=1), rng_weights(96, 80, seed=2)
    src = matmul_model(tmp_path / "m.onnx", {"w1": w1, "w2": w2})
    dst = tmp_path / "out.onnx"
    report = compress(src, dst, Recipe(recipe))
    model = onnx.load(str(dst))
    onnx.checker.check_model(model, full_check=True)
    calls = {n.output[0]: n for n in model.graph.node if n.domain == "modelpress"}
    assert sorted(calls) == ["w1", "w2"]
    assert {n.op_type for n in calls.values()} == {kind}
    assert [f.name for f in model.functions] == [kind]   # one shared decode function
    inits = {t.name: t for t in model.graph.initializer}
    assert inits[calls["w1"].input[0]].data_type == stored
    assert set(inits).isdisjoint({"w1", "w2"})
    store = open_model(dst)
    for row in report.rows:
        original = {"w1": w1, "w2": w2}[row.name]
        # onnxruntime's decode is exactly what the stored tree decodes to ...
        np.testing.assert_array_equal(dequantized(dst, row.name), store.decode(row.name).decode())
        # ... and the table's error and bytes are those of the written file.
        independent = compare(original, dequantized(dst, row.name))
        assert independent.rel_l2 == pytest.approx(row.error.rel_l2, rel=1e-5)
        assert row.bytes_after == sum(len(inits[i].raw_data) for i in calls[row.name].input)
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    ref = x @ w1 @ w2
    out = ort_run(dst, {"x": x})[0]
    limit = {8: 0.02, 4: 0.2, 3: 0.4, 2: 0.8}[recipe[0].bits]
    assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < limit
    # onnxruntime folds the chains when it loads the model: float32 MatMuls remain.
    assert optimized_ops(dst, tmp_path) == ["MatMul", "MatMul"]


def test_int4_raises_opset_and_says_so(tmp_path: Path) -> None:
    src = matmul_model(tmp_path / "m.onnx", {"w": rng_weights(64, 64)}, opset=17)
    report = compress(src, tmp_path / "o.onnx", Recipe([Quantize(bits=4, all_layers=True)]))
    assert "ONNX opset raised from 17 to 18" in " ".join(report.notes)   # bitwise ops
    model = onnx.load(str(tmp_path / "o.onnx"))
    assert [o.version for o in model.opset_import if o.domain == ""] == [18]
    # The 4-bit kernel form (blocked DequantizeLinear) needs opset 21.
    compress(src, tmp_path / "k.onnx", Recipe([Quantize(bits=4, all_layers=True)]),
             onnx_options=OnnxWriteOptions(target=OnnxTarget(int4="kernel")))
    model = onnx.load(str(tmp_path / "k.onnx"))
    assert [o.version for o in model.opset_import if o.domain == ""] == [21]
    assert model.ir_version == 10


def test_int8_channel_keeps_opset_13(tmp_path: Path) -> None:
    src = matmul_model(tmp_path / "m.onnx", {"w": rng_weights(64, 64)}, opset=13)
    report = compress(src, tmp_path / "o.onnx",
                      Recipe([Quantize(bits=8, granularity="channel", scale_bits=0)]))
    assert report.notes == []
    model = onnx.load(str(tmp_path / "o.onnx"))
    assert [o.version for o in model.opset_import if o.domain == ""] == [13]


def test_unconvertible_opset_is_refused_clearly(tmp_path: Path) -> None:
    # opset 11 Split with a 'split' attribute; the converter cannot bring Upsample-era ops up.
    w = rng_weights(64, 64)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"]),
         helper.make_node("Upsample", ["y", "scales"], ["z"], mode="nearest")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [1, 128])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.array([1, 2], np.float32),
                                                                   "scales")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)])
    model.ir_version = 4
    onnx.save(model, str(tmp_path / "old.onnx"))
    try:
        compress(tmp_path / "old.onnx", tmp_path / "o.onnx", Recipe([Quantize(bits=4)]))
    except ModelWriteError as exc:
        assert "needs ONNX opset 18 (the model has 9)" in str(exc)
        assert "--bits 8 --granularity channel --scale-bits 0" in str(exc)
        assert not (tmp_path / "o.onnx").exists()
    else:  # the converter managed: then the output must be valid
        onnx.checker.check_model(str(tmp_path / "o.onnx"), full_check=True)


def _if_model(path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """A model whose weights live in an If branch, outside it, and in a Constant node."""
    w_outer, w_branch, w_const = (rng_weights(64, 64, seed=s) for s in (1, 2, 3))
    then_graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w_branch"], ["t_out"])], "then", [],
        [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, [2, 64])],
        [numpy_helper.from_array(w_branch, "w_branch")])
    else_graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w_outer"], ["e_out"])], "else", [],
        [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, [2, 64])])
    nodes = [
        helper.make_node("Constant", [], ["w_const"], value=numpy_helper.from_array(w_const)),
        helper.make_node("If", ["cond"], ["branch"], then_branch=then_graph, else_branch=else_graph),
        helper.make_node("MatMul", ["branch", "w_const"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "main",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64]),
         helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 64])],
        [numpy_helper.from_array(w_outer, "w_outer")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path, {"w_outer": w_outer, "w_branch": w_branch, "w_const": w_const}


SUBGRAPH_RECIPES = {
    "int8": [Quantize(bits=8)], "int4": [Quantize(bits=4)], "fp16": [Cast(dtype="fp16")],
    "fp8": [Cast(dtype="fp8-e4m3")], "2:4+int4": [Prune(pattern="2:4"), Quantize(bits=4)],
    "cluster": [Cluster(bits=4, per_channel=True)], "prune+cluster": [Prune(), Cluster(bits=3)],
    "lowrank": [Factorize(rank=16)], "lowrank+int8": [Factorize(rank=16), Quantize(bits=8)],
}


@pytest.mark.parametrize("recipe", sorted(SUBGRAPH_RECIPES))
def test_subgraph_and_constant_weights_are_found_and_compressed(tmp_path: Path,
                                                                recipe: str) -> None:
    src, weights = _if_model(tmp_path / "if.onnx")
    store = open_model(src)
    assert {n for n, i in store.tensors.items() if i.weight_like} == set(weights)
    report = compress(src, tmp_path / "o.onnx", Recipe(SUBGRAPH_RECIPES[recipe]))
    assert {r.name for r in report.rows} == set(weights)
    onnx.checker.check_model(str(tmp_path / "o.onnx"), full_check=True)
    out_store = open_model(tmp_path / "o.onnx")
    approx = {name: out_store.decode(name).decode() for name in weights}
    for row in report.rows:
        assert compare(weights[row.name], approx[row.name]).rel_l2 == pytest.approx(
            row.error.rel_l2, rel=1e-6)
    x = np.random.default_rng(5).standard_normal((2, 64)).astype(np.float32)
    for cond, first in ((True, "w_branch"), (False, "w_outer")):
        expected = x @ approx[first] @ approx["w_const"]
        out = ort_run(tmp_path / "o.onnx", {"x": x, "cond": np.array(cond)}, exact=True)[0]
        np.testing.assert_allclose(out, expected, rtol=1e-3, atol=1e-3)
    # decompress restores every weight where it was, and the model runs as the decoded one
    from modelpress import decompress
    decompress(tmp_path / "o.onnx", tmp_path / "d.onnx")
    onnx.checker.check_model(str(tmp_path / "d.onnx"), full_check=True)
    out = ort_run(tmp_path / "d.onnx", {"x": x, "cond": np.array(True)})[0]
    np.testing.assert_allclose(out, x @ approx["w_branch"] @ approx["w_const"], rtol=1e-3,
                               atol=1e-3)


def test_pruned_onnx_keeps_dense_zeros(tmp_path: Path) -> None:
    w = rng_weights(64, 64)
    src = matmul_model(tmp_path / "m.onnx", {"w": w})
    report = compress(src, tmp_path / "o.onnx", Recipe([Prune(sparsity=0.5)]))
    stored = initializer(tmp_path / "o.onnx", "w")
    assert int((stored == 0).sum()) == 64 * 64 // 2
    assert report.rows[0].bytes_after == w.nbytes  # no saving claimed that the file lacks
    assert report.rows[0].error.rel_l2 == pytest.approx(compare(w, stored).rel_l2, rel=1e-6)


def test_decompress_onnx_restores_dense_initializers(tmp_path: Path, samples: Path) -> None:
    from modelpress import decompress
    compress(samples / "transformer.onnx", tmp_path / "q.onnx", Recipe([Quantize(bits=4)]))
    decompress(tmp_path / "q.onnx", tmp_path / "d.onnx")
    model = onnx.load(str(tmp_path / "d.onnx"))
    assert not any(n.op_type == "DequantizeLinear" for n in model.graph.node)
    original = {t.name: numpy_helper.to_array(t) for t in onnx.load(
        str(samples / "transformer.onnx")).graph.initializer}
    restored = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    assert set(restored) == set(original)
    for name, array in original.items():
        assert restored[name].shape == array.shape and restored[name].dtype == array.dtype
    ids = np.arange(16, dtype=np.int64).reshape(1, 16)
    q_out = ort_run(tmp_path / "q.onnx", {"input_ids": ids}, exact=True)[0]
    d_out = ort_run(tmp_path / "d.onnx", {"input_ids": ids}, exact=True)[0]
    np.testing.assert_allclose(d_out, q_out, rtol=1e-5, atol=1e-5)
