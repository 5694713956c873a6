"""The writer's working copy borrows large tensors from the source model (modelpress.formats.onnx.borrow)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from modelpress.formats.onnx.borrow import BORROWED, borrow, checkable, give_back, is_borrowed

from conftest import ort_run, rng_weights, run_cli


def _model(path: Path) -> onnx.ModelProto:
    """MatMul by W (24 KiB) and a bias, then an If whose branches add a subgraph
    initializer or a Constant (384 bytes each)."""
    out = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 96])]
    then_graph = helper.make_graph(
        [helper.make_node("Add", ["h", "t_add"], ["t_out"])], "then", [],
        [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, [2, 96])],
        [numpy_helper.from_array(rng_weights(96, seed=2), "t_add")])
    else_graph = helper.make_graph(
        [helper.make_node("Constant", [], ["c"],
                          value=numpy_helper.from_array(rng_weights(96, seed=3), "c_value")),
         helper.make_node("Add", ["h", "c"], ["e_out"])], "else", [],
        [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, [2, 96])])
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h0"]),
             helper.make_node("Add", ["h0", "bias"], ["h"]),
             helper.make_node("If", ["flag"], ["y"], then_branch=then_graph,
                              else_branch=else_graph)]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64]),
                     helper.make_tensor_value_info("flag", TensorProto.BOOL, [])], out,
        [numpy_helper.from_array(rng_weights(64, 96, seed=1), "W"),
         numpy_helper.from_array(rng_weights(96, seed=4), "bias")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return model


def _tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    from modelpress.formats.onnx.graph import graphs
    found = []
    for graph in graphs(model.graph):
        found += list(graph.initializer)
        found += [a.t for n in graph.node if n.op_type == "Constant" for a in n.attribute]
    return found


def test_borrow_holds_headers_and_give_back_restores_the_model(tmp_path: Path) -> None:
    model = _model(tmp_path / "m.onnx")
    copy, sources = borrow(model)
    borrowed = [t for t in _tensors(copy) if is_borrowed(t)]
    # W (24 KiB), the subgraph initializer and the Constant (384 B each: below 1 KiB) ...
    assert [t.name for t in borrowed] == ["W"]
    assert not borrowed[0].HasField("raw_data") and list(borrowed[0].dims) == [64, 96]
    assert {e.value for e in borrowed[0].external_data if e.key == "location"} == {BORROWED}
    onnx.checker.check_model(checkable(copy))
    give_back(copy, sources)
    assert copy.SerializeToString() == model.SerializeToString()


def test_large_subgraph_tensors_are_borrowed_and_given_back(tmp_path: Path,
                                                            monkeypatch) -> None:
    import modelpress.formats.onnx.borrow as onnx_borrow
    monkeypatch.setattr(onnx_borrow, "BORROW_FROM", 64)
    model = _model(tmp_path / "m.onnx")
    copy, sources = borrow(model)
    assert sorted(t.name for t in _tensors(copy) if is_borrowed(t)) == [
        "W", "bias", "c_value", "t_add"]
    onnx.checker.check_model(checkable(copy))
    give_back(copy, sources)
    assert copy.SerializeToString() == model.SerializeToString()


def test_compressed_output_keeps_unencoded_tensors_and_no_borrowed_reference(
        tmp_path: Path, monkeypatch) -> None:
    import modelpress.formats.onnx.borrow as onnx_borrow
    monkeypatch.setattr(onnx_borrow, "BORROW_FROM", 64)  # subgraph tensors borrowed too
    src = tmp_path / "m.onnx"
    model = _model(src)
    out = tmp_path / "q.onnx"
    result = run_cli(["compress", str(src), "-o", str(out), "--no-eval", "--quiet",
                      "quantize", "--bits", "8"])
    assert result.exit_code == 0, result.output
    written = onnx.load(str(out))
    assert not any(is_borrowed(t) for t in _tensors(written))
    kept = {t.name: numpy_helper.to_array(t) for t in _tensors(written)}
    for t in _tensors(model):
        if t.name != "W":  # the one weight: quantized
            np.testing.assert_array_equal(kept[t.name], numpy_helper.to_array(t))
    x = rng_weights(2, 64, seed=9)
    for flag in (True, False):
        feeds = {"x": x, "flag": np.array(flag)}
        got, want = ort_run(out, feeds)[0], ort_run(src, feeds)[0]
        assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.02  # int8 W only
