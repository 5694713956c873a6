"""SmoothQuant smoothing (issue 19): the float model's outputs stay the same, the scale
moves where the paper says, and MatMuls that cannot be smoothed are named with why."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from modelpress.formats.onnx.activation_stats import collect_stats
from modelpress.formats.onnx.smooth import sites, smooth

from conftest import ort_run, samples  # noqa: F401 (fixture)


def _model() -> onnx.ModelProto:
    """LayerNorm -> MatMul and Gemm(transB); MatMul+Add -> MatMul; Mul+Add -> Gemm; Relu ->
    MatMul (not smoothable); a second LayerNorm sharing the first one's constants whose
    output also feeds a Sigmoid (not smoothable)."""
    rng = np.random.default_rng(0)
    gamma = rng.uniform(0.5, 1.5, 16).astype(np.float32)
    gamma[3] = 25.0  # an outlier channel
    consts = {"gamma": gamma, "beta": rng.normal(0, 0.1, 16).astype(np.float32),
              "a1": rng.standard_normal((16, 12)).astype(np.float32),
              "a2": rng.standard_normal((12, 16)).astype(np.float32),
              "a2b": rng.standard_normal(12).astype(np.float32),
              "b1": rng.standard_normal(12).astype(np.float32),
              "wb": rng.standard_normal((12, 6)).astype(np.float32),
              "g": rng.uniform(0.1, 8, 12).astype(np.float32),
              "c": rng.standard_normal(12).astype(np.float32),
              "wc": rng.standard_normal((12, 5)).astype(np.float32),
              "wd": rng.standard_normal((16, 3)).astype(np.float32),
              "we": rng.standard_normal((16, 2)).astype(np.float32)}
    nodes = [helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["ln"]),
             helper.make_node("MatMul", ["ln", "a1"], ["a1_out"], name="mm_a1"),
             helper.make_node("Gemm", ["ln", "a2", "a2b"], ["a2_out"], transB=1),
             helper.make_node("Add", ["a1_out", "b1"], ["h1"]),
             helper.make_node("MatMul", ["h1", "wb"], ["y1"]),
             helper.make_node("Mul", ["a2_out", "g"], ["m"]),
             helper.make_node("Add", ["m", "c"], ["aff"]),
             helper.make_node("Gemm", ["aff", "wc"], ["y2"]),
             helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("MatMul", ["r", "wd"], ["y3"], name="mm_relu"),
             helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["ln2"]),
             helper.make_node("MatMul", ["ln2", "we"], ["e"], name="mm_shared"),
             helper.make_node("Sigmoid", ["ln2"], ["sg"]),
             helper.make_node("ReduceSum", ["sg"], ["y4"], keepdims=0)]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape) for n, shape in (
        ("y1", ["batch", 6]), ("y2", ["batch", 5]), ("y3", ["batch", 3]), ("e", ["batch", 2]),
        ("y4", []))]
    graph = helper.make_graph(
        nodes, "smooth", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 16])],
        outputs, [numpy_helper.from_array(v, k) for k, v in consts.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


def test_smoothing_keeps_the_outputs_and_balances_channels(tmp_path: Path) -> None:
    model = _model()
    path = tmp_path / "m.onnx"
    onnx.save(model, str(path))
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "cal.npz", x=rng.standard_normal((64, 16)).astype(np.float32))
    found, _ = sites(model)
    assert [s.activation for s in found] == ["ln", "h1", "aff"]
    stats = collect_stats(path, model, tmp_path / "cal.npz", [],
                          channels=[s.activation for s in found])
    smoothed, notes = smooth(model, stats.absmax, alpha=0.5)
    assert notes[0] == "smooth: 3 activations smoothed (alpha 0.5): ln, h1, aff"
    assert any("'mm_relu' not smoothed: its input 'r' comes from Relu" in n for n in notes)
    assert any("'mm_shared' not smoothed: its input 'ln2' also feeds Sigmoid" in n
               for n in notes)
    out = tmp_path / "smoothed.onnx"
    onnx.save(smoothed, str(out))
    onnx.checker.check_model(smoothed)
    x = rng.standard_normal((32, 16)).astype(np.float32)  # other inputs than calibration
    for before, after in zip(ort_run(path, {"x": x}, exact=True),
                             ort_run(out, {"x": x}, exact=True)):
        assert _rel(before, after) < 1e-5
    # alpha 0.5: each channel's activation peak now equals its weights' peak (the paper's
    # balance), and the outlier channel's peak shrank (ln alone: smoothing h1 rescales a1)
    only_ln, _ = smooth(model, {"ln": stats.absmax["ln"]})
    onnx.save(only_ln, str(out))
    after = collect_stats(out, only_ln, tmp_path / "cal.npz", [], channels=["ln"]).absmax["ln"]
    inits = {t.name: numpy_helper.to_array(t) for t in only_ln.graph.initializer}
    rows = np.maximum(np.abs(inits["a1"]).max(axis=1), np.abs(inits["a2"]).max(axis=0))
    np.testing.assert_allclose(after, rows, rtol=1e-4)
    assert after.max() / after.min() < stats.absmax["ln"].max() / stats.absmax["ln"].min()
    # LayerNorm 2 shares the constants and is not smoothed: they were copied, not changed
    assert list(smoothed.graph.node[10].input) == ["x", "gamma", "beta"]
    assert list(smoothed.graph.node[0].input) == ["x", "gamma/smoothed", "beta/smoothed"]
    np.testing.assert_array_equal(inits["gamma"], numpy_helper.to_array(model.graph.initializer[0]))


def test_smoothing_the_sample_transformer_keeps_its_outputs(samples: Path,  # noqa: F811
                                                            tmp_path: Path) -> None:
    path = samples / "transformer.onnx"
    model = onnx.load(str(path))
    with np.load(samples / "transformer_test_inputs.npz") as data:
        ids = data["input_ids"].astype(np.int64)
    np.savez(tmp_path / "cal.npz", input_ids=ids[:16])
    found, _ = sites(model)
    stats = collect_stats(path, model, tmp_path / "cal.npz", [],
                          channels=[s.activation for s in found])
    smoothed, notes = smooth(model, stats.absmax)
    assert notes[0].startswith("smooth: 3 activations smoothed")
    assert any("'layers.0.attn.o_proj.out' not smoothed" in n and "Reshape" in n for n in notes)
    assert any("'layers.0.mlp.fc2.matmul' not smoothed" in n for n in notes)
    out = tmp_path / "smoothed.onnx"
    onnx.save(smoothed, str(out))
    feeds = {"input_ids": ids[16:]}
    before, after = ort_run(path, feeds, exact=True)[0], ort_run(out, feeds, exact=True)[0]
    assert _rel(before, after) < 1e-5


def test_smoothing_needs_per_channel_statistics() -> None:
    model = _model()
    with pytest.raises(ValueError, match="alpha must be in"):
        smooth(model, {}, alpha=1.5)
    smoothed, notes = smooth(model, {})
    assert "smooth: 'ln' not smoothed: no per-channel statistics" in notes
    assert smoothed.graph.initializer == model.graph.initializer
