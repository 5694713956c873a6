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
         numpy_helper.from_array(np.array([-1, 3 * 32 * 32], np.int64), "shape")])
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
    assert note.endswith("input 'x' [1, 3, 16, 16] (batch=1, height=16, width=16 made up): "
                         "give the real sizes with --dim NAME=N, or real inputs with "
                         "--inputs FILE.npz")
    result = run("compress", src, "-o", tmp_path / "o.onnx", "--quiet", "--report", report,
                 "--dim", "height=32", "--dim", "width=32", "quantize")
    assert result.returncode == 0, result.stderr
    assert json.loads(report.read_text())["evaluation"]["status"] == "ok"


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
