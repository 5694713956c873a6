"""Reading ONNX weights without protobuf copies (modelpress.formats.onnx.wire) and the cheaper writer tail."""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from modelpress.formats import open_model
from modelpress.formats.onnx.borrow import BORROWED, borrow, give_back, is_borrowed
from modelpress.formats.onnx.wire import parse_mapped, raw_spans
from modelpress.formats.onnx.write import _save_serialized, _serialized

from conftest import SAMPLES, matmul_model, rng_weights, sha256


def _typed_model(path: Path) -> Path:
    """Initializers of several float types, one in float_data (no raw_data), a Constant."""
    rng = np.random.default_rng(0)
    bf16 = numpy_helper.from_array(rng.standard_normal((16, 8)).astype(ml_dtypes.bfloat16), "b")
    typed = helper.make_tensor("typed", TensorProto.FLOAT, [4, 8],
                               rng.standard_normal(32).astype(np.float32).tolist())
    inits = [numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "f32"),
             numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float16), "f16"),
             numpy_helper.from_array(rng.standard_normal((2, 8)), "f64"), bf16, typed,
             numpy_helper.from_array(np.arange(6, dtype=np.int64), "i64"),
             numpy_helper.from_array(np.zeros((0, 8), np.float32), "empty")]
    nodes = [helper.make_node("Constant", [], ["c"],
                              value=numpy_helper.from_array(np.ones((3, 8), np.float32), "cv")),
             helper.make_node("MatMul", ["x", "f32"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                         [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(path))
    return path


def _paths(tmp_path: Path) -> list[Path]:
    return [SAMPLES / "mlp.onnx", SAMPLES / "cnn.onnx", SAMPLES / "transformer.onnx",
            _typed_model(tmp_path / "typed.onnx")]


def test_spans_point_at_each_initializers_raw_data(tmp_path: Path) -> None:
    for path in _paths(tmp_path):
        model, spans = parse_mapped(path)
        assert model == onnx.load(str(path), load_external_data=False)
        data = path.read_bytes()
        with_raw = [t for t in model.graph.initializer if t.HasField("raw_data")]
        assert len(spans) == len(with_raw) > 0
        for tensor in with_raw:
            offset, length = spans.span(tensor)
            assert data[offset:offset + length] == tensor.raw_data, tensor.name
        assert all(spans.span(t) is None for t in model.graph.initializer
                   if not t.HasField("raw_data"))
        assert spans.span(onnx.load(str(path)).graph.initializer[0]) is None  # another copy


def test_store_reads_each_type_as_to_array_does(tmp_path: Path) -> None:
    path = _typed_model(tmp_path / "typed.onnx")
    store = open_model(path)
    reference = onnx.load(str(path))
    for tensor in reference.graph.initializer:
        got, want = store.read(tensor.name), numpy_helper.to_array(tensor)
        assert got.dtype == want.dtype and got.shape == want.shape, tensor.name
        np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))
    np.testing.assert_array_equal(store.read("c"), np.ones((3, 8), np.float32))


def test_a_layout_the_walk_does_not_follow_falls_back(tmp_path: Path) -> None:
    path = matmul_model(tmp_path / "m.onnx", {"W": rng_weights(16, 8, seed=1)})
    model = onnx.load(str(path))
    # A second `graph` field (protobuf merges it into the first): the walk gives up.
    extra = onnx.ModelProto()
    extra.graph.initializer.append(numpy_helper.from_array(rng_weights(4, 4, seed=2), "V"))
    doubled = tmp_path / "doubled.onnx"
    doubled.write_bytes(model.SerializeToString() + extra.SerializeToString())
    assert raw_spans(doubled.read_bytes()) is None
    parsed, spans = parse_mapped(doubled)
    assert len(spans) == 0 and [t.name for t in parsed.graph.initializer] == ["W", "V"]
    store = open_model(doubled)
    np.testing.assert_array_equal(store.read("W"), rng_weights(16, 8, seed=1))
    np.testing.assert_array_equal(store.read("V"), rng_weights(4, 4, seed=2))
    assert raw_spans(model.SerializeToString()[:-3]) is None  # truncated


def test_empty_and_invalid_files_keep_their_messages(tmp_path: Path) -> None:
    from modelpress.core.errors import ModelReadError
    empty = tmp_path / "e.onnx"
    empty.write_bytes(b"")
    with pytest.raises(ModelReadError, match="file is empty"):
        open_model(empty)
    junk = tmp_path / "j.onnx"
    junk.write_bytes(b"\xff" * 64)
    with pytest.raises(ModelReadError, match="not a valid ONNX model"):
        open_model(junk)


def test_lending_twice_keeps_the_two_apart(tmp_path: Path) -> None:
    path = matmul_model(tmp_path / "m.onnx", {"W": rng_weights(64, 32, seed=1),
                                              "U": rng_weights(32, 16, seed=2)})
    model = onnx.load(str(path))
    outer, outer_sources = borrow(model)
    outer.graph.initializer.append(numpy_helper.from_array(rng_weights(40, 40, seed=3), "new"))
    inner, inner_sources = borrow(outer, location="<lent again>")
    assert [t.name for t in inner_sources] == ["new"]
    assert [t.name for t in inner.graph.initializer if is_borrowed(t)] == ["W", "U"]
    assert [t.name for t in inner.graph.initializer if is_borrowed(t, "<lent again>")] == ["new"]
    give_back(inner, inner_sources, "<lent again>")
    assert inner.SerializeToString() == outer.SerializeToString()
    assert {e.value for t in inner.graph.initializer[:2] for e in t.external_data
            if e.key == "location"} == {BORROWED}


def test_serialized_once_writes_what_onnx_save_writes(tmp_path: Path) -> None:
    model = onnx.load(str(SAMPLES / "transformer.onnx"))
    data = _serialized(model)
    assert data == model.SerializeToString()
    _save_serialized(model, data, tmp_path / "a.onnx")
    onnx.save_model(model, str(tmp_path / "b.onnx"))
    assert sha256(tmp_path / "a.onnx") == sha256(tmp_path / "b.onnx")


def test_serialized_is_none_over_the_limit(monkeypatch) -> None:
    import modelpress.formats.onnx.write as onnx_write
    model = onnx.load(str(SAMPLES / "mlp.onnx"))
    monkeypatch.setattr(onnx_write, "PROTOBUF_LIMIT", model.ByteSize() - 1)
    assert _serialized(model) is None
