"""Output evaluation on models like real ones (issue 16, item 4)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from modelpress.core.evaluate import compare_outputs, looks_like_class_scores

pytest.importorskip("onnxruntime")


def fixed_size_conv_head(path: Path) -> Path:
    """Input [batch, 3, height, width] flattened into a 3072-row MatMul: runs at 32x32 only."""
    w = np.random.default_rng(0).standard_normal((3 * 32 * 32, 10)).astype(np.float32)
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["f"]),
             helper.make_node("MatMul", ["f", "w"], ["logits"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                   ["batch", 3, "height", "width"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])],
        [numpy_helper.from_array(w, "w"),
         numpy_helper.from_array(np.array([1, 3 * 32 * 32], np.int64), "shape")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def run(*args: object) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "modelpress", *map(str, args)],
                          capture_output=True, text=True, env={"NO_COLOR": "1", "PATH": ""})


def test_a_rejected_made_up_input_says_how_to_fix_it_and_ort_stays_quiet(tmp_path: Path) -> None:
    src = fixed_size_conv_head(tmp_path / "m.onnx")
    report = tmp_path / "r.json"
    result = run("compress", src, "-o", tmp_path / "o.onnx", "--quiet", "--report", report,
                 "quantize")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "" and result.stderr == ""   # nothing from onnxruntime's own log
    (note,) = json.loads(report.read_text())["evaluation"]["notes"]
    assert note.startswith(f"output error not measured: onnxruntime cannot run {src}: ")
    assert note.endswith("input 'x' [1, 3, 64, 64] (batch=1, height=64, width=64 made up): "
                         "give the real sizes with --dim NAME=N, or real inputs with "
                         "--inputs FILE.npz")
    result = run("compress", src, "-o", tmp_path / "o.onnx", "--quiet", "--report", report,
                 "--dim", "height=32", "--dim", "width=32", "quantize")
    assert result.returncode == 0, result.stderr
    assert json.loads(report.read_text())["evaluation"]["status"] == "ok"


def down_and_up_by_32(path: Path) -> Path:
    """A fully convolutional map: pooled by 32 and resized back, added to its input.

    Any height and width that are multiples of 32 run; 16 does not (the pooling
    window is larger than the image).
    """
    nodes = [helper.make_node("AveragePool", ["x"], ["p"], kernel_shape=[32, 32],
                              strides=[32, 32]),
             helper.make_node("Resize", ["p", "", "scales"], ["u"], mode="nearest"),
             helper.make_node("Add", ["x", "u"], ["s"]),
             helper.make_node("Conv", ["s", "k"], ["segmentation"])]
    k = np.random.default_rng(1).standard_normal((8, 3, 1, 1)).astype(np.float32)
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, "h", "w"])],
        [helper.make_tensor_value_info("segmentation", TensorProto.FLOAT, ["n", 8, "h", "w"])],
        [numpy_helper.from_array(np.array([1, 1, 32, 32], np.float32), "scales"),
         numpy_helper.from_array(np.tile(k, (1, 1, 1, 1)), "k")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def lstm_with_state_inputs(path: Path) -> Path:
    """A voice-activity-like LSTM: audio frames, and its state h/c fed back by the caller,
    every state dim symbolic (a hidden size of 16 is rejected: the LSTM has 48)."""
    rng = np.random.default_rng(2)
    w = rng.standard_normal((1, 4 * 48, 40)).astype(np.float32) * 0.1
    r = rng.standard_normal((1, 4 * 48, 48)).astype(np.float32) * 0.1
    head = rng.standard_normal((48, 1)).astype(np.float32)
    nodes = [helper.make_node("LSTM", ["frames", "W", "R", "", "", "h0", "c0"],
                              ["y", "hn", "cn"], hidden_size=48),
             helper.make_node("Squeeze", ["y", "axis1"], ["y2"]),
             helper.make_node("MatMul", ["y2", "head"], ["speech"])]
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("frames", TensorProto.FLOAT, ["time", "batch", 40]),
         helper.make_tensor_value_info("h0", TensorProto.FLOAT, ["a", "b", "c"]),
         helper.make_tensor_value_info("c0", TensorProto.FLOAT, ["a", "b", "c"])],
        [helper.make_tensor_value_info(
            n, TensorProto.FLOAT, ["time", "batch", 1] if n == "speech" else ["a", "b", "c"])
         for n in ("speech", "hn", "cn")],
        [numpy_helper.from_array(w, "W"), numpy_helper.from_array(r, "R"),
         numpy_helper.from_array(head, "head"),
         numpy_helper.from_array(np.array([1], np.int64), "axis1")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


@pytest.mark.parametrize("build", [down_and_up_by_32, lstm_with_state_inputs])
def test_models_with_symbolic_sizes_run_without_dim_or_inputs(tmp_path: Path, build) -> None:
    from conftest import run_cli
    src = build(tmp_path / "m.onnx")
    result = run_cli(["compress", src, "-o", tmp_path / "o.onnx", "--format", "json",
                      "--min-elements", "1", "quantize"])
    assert result.exit_code == 0, result.output
    evaluation = json.loads(result.output)["evaluation"]
    assert evaluation["status"] == "ok", evaluation["notes"]
    arrays = evaluation["inputs"]["arrays"]
    if build is down_and_up_by_32:
        assert arrays["x"]["shape"] == [1, 3, 64, 64]
        (row,) = evaluation["outputs"]
        assert row["top1_agreement"] is None     # a map, not class scores
    else:
        assert arrays["h0"]["shape"] == arrays["c0"]["shape"] == [1, 1, 48]
        assert {row["name"]: row["top1_agreement"] for row in evaluation["outputs"]} == {
            "speech": None, "hn": None, "cn": None}


@pytest.mark.parametrize("name, shape, scores", [
    ("logits", (4, 10), True), ("probabilities", (2, 16, 50), True),
    ("output", (4, 1), False),                       # one value per sample
    ("segmentation", (1, 3, 64, 64), False),         # a map
    ("stateN", (2, 1, 128), False), ("hn", (1, 1, 64), False),
    ("last_hidden_state", (1, 16, 384), False), ("pooled_output", (1, 384), False),
    ("sentence_embedding", (1, 384), False)])
def test_top1_only_for_class_scores(name: str, shape: tuple[int, ...], scores: bool) -> None:
    array = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    assert looks_like_class_scores(name, array) is scores
    (row,) = compare_outputs({name: array}, {name: array * 1.01})
    assert (row.top1_agreement is not None) is scores


def test_latency_alternates_the_models_and_shows_the_spread(tmp_path: Path) -> None:
    from conftest import run_cli
    samples = Path(__file__).resolve().parent.parent / "sample_models"
    result = run_cli(["compress", samples / "mlp.onnx", "-o", tmp_path / "o.onnx", "--format",
                      "json", "quantize"])
    assert result.exit_code == 0, result.output
    latency = json.loads(result.output)["evaluation"]["latency"]
    assert latency["runs_before"] == latency["runs_after"] >= 3
    for model in ("before", "after"):
        assert latency[f"{model}_q1_ms"] <= latency[f"{model}_ms"] <= latency[f"{model}_q3_ms"]
    result = run_cli(["compress", samples / "mlp.onnx", "-o", tmp_path / "o.onnx", "quantize"])
    line = next(x for x in result.output.splitlines() if x.startswith("latency"))
    assert line.startswith("latency (median of ") and " alternating onnxruntime CPU runs of " \
        "each model on this machine; [interquartile range]): " in line
