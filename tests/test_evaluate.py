"""Output comparison, thresholds, Pareto front and evaluation inputs (library level)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from modelpress.core.errors import InputDataError
from modelpress.core.evaluate import (Accuracy, Evaluation, compare_outputs, correct_count, label_output,
                                      shared_samples, top1_agreement)
from modelpress.core.report import Report
from modelpress.app.sweep import pareto_front
from modelpress.core.thresholds import Thresholds, check
from modelpress.formats.onnx import run as onnx_run

from conftest import matmul_model, rng_weights


def test_compare_outputs_metrics_and_top1() -> None:
    ref = np.array([[1.0, 2.0, 0.0], [0.0, 1.0, 3.0]], dtype=np.float32)
    got = np.array([[1.0, 2.0, 0.0], [0.0, 4.0, 3.0]], dtype=np.float32)
    (row,) = compare_outputs({"y": ref}, {"y": got})
    assert row.name == "y" and row.shape == (2, 3)
    assert row.error.rel_l2 == pytest.approx(3.0 / math.sqrt(15.0))
    assert row.error.max_abs == 3.0
    assert row.top1_agreement == 0.5  # row 2's argmax moves from 2 to 1


def test_top1_only_for_class_scores() -> None:
    assert top1_agreement(np.ones((4, 1), np.float32), np.ones((4, 1), np.float32)) is None
    assert top1_agreement(np.arange(4), np.arange(4)) is None  # integer outputs
    assert top1_agreement(np.eye(3, dtype=np.float32), np.eye(3, dtype=np.float32)) == 1.0


def test_compare_outputs_shape_mismatch() -> None:
    with pytest.raises(ValueError, match="output 'y'"):
        compare_outputs({"y": np.zeros((2, 3))}, {"y": np.zeros((3, 2))})


def test_labels_pick_the_class_score_output() -> None:
    shapes = {"hidden": (5, 1), "logits": (5, 10)}
    assert label_output(shapes, np.zeros(5, np.int64), "l.npy") == "logits"
    with pytest.raises(InputDataError, match="l.npy: labels of shape \\[4\\] match no output"):
        label_output(shapes, np.zeros(4, np.int64), "l.npy")
    assert correct_count(np.eye(3), np.array([0, 1, 0])) == 2


def test_pareto_front_exact() -> None:
    # (size, error): (3, 3) is dominated by (2, 2); equal points are both on the front.
    points = [(1.0, 5.0), (2.0, 2.0), (3.0, 3.0), (4.0, 1.0), (2.0, 2.0), (5.0, 1.0)]
    assert pareto_front(points) == [True, True, False, True, True, False]
    assert pareto_front([]) == []


def _report(before: int, after: int, evaluation: Evaluation | None = None) -> Report:
    return Report("a.onnx", "b.onnx", "onnx", {}, file_bytes_before=before,
                  file_bytes_after=after, evaluation=evaluation)


def test_thresholds_pass_and_fail_with_measured_values() -> None:
    evaluation = Evaluation("ok", accuracy=Accuracy("logits", 1000, 917, 912))
    evaluation.outputs = compare_outputs({"logits": np.ones((2, 2), np.float32)},
                                         {"logits": np.full((2, 2), 1.1, np.float32)})
    report = _report(400, 100, evaluation)
    checks = check(Thresholds(max_output_error=0.05, min_accuracy=0.91, min_ratio=4.0,
                              max_error=0.0), report)
    by_option = {c.option: c for c in checks}
    assert [c.option for c in checks] == ["--max-error", "--max-output-error", "--min-accuracy",
                                          "--min-ratio"]
    assert by_option["--max-error"].passed  # no tensor changed: weight error 0
    assert not by_option["--max-output-error"].passed
    assert by_option["--max-output-error"].measured == pytest.approx(0.1)
    assert "worst output error ('logits') 0.1 > 0.05" in by_option["--max-output-error"].message
    assert by_option["--min-accuracy"].passed and by_option["--min-accuracy"].measured == 0.912
    assert by_option["--min-ratio"].passed and by_option["--min-ratio"].measured == 4.0
    failed = check(Thresholds(min_ratio=4.01), report)[0]
    assert not failed.passed and "4.000x < 4.01x" in failed.message


def test_unmeasured_threshold_fails_and_says_why() -> None:
    report = _report(2, 1, Evaluation("unavailable", notes=[
        "output error not measured: onnxruntime is not installed"]))
    (result,) = check(Thresholds(max_output_error=1.0), report)
    assert not result.passed and result.measured is None
    assert result.message == ("--max-output-error 1: output error was not measured "
                              "(onnxruntime is not installed)")


def _embedding_model(path: Path, rows: int = 37) -> Path:
    """ids -> Cast -> Gather(table) -> MatMul: the ids must stay in [0, rows)."""
    table = rng_weights(rows, 8)
    nodes = [helper.make_node("Cast", ["ids"], ["ids64"], to=TensorProto.INT64),
             helper.make_node("Gather", ["table", "ids64"], ["emb"]),
             helper.make_node("MatMul", ["emb", "w"], ["y"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT32, ["batch", "seq"]),
                     helper.make_tensor_value_info("flag", TensorProto.INT64, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", 4])],
        [numpy_helper.from_array(table, "table"), numpy_helper.from_array(rng_weights(8, 4), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_random_inputs_follow_signature_and_gather_range(tmp_path: Path) -> None:
    model = onnx.load(str(_embedding_model(tmp_path / "e.onnx")))
    assert onnx_run.gather_ranges(model) == {"ids": (0, 37)}
    feeds = onnx_run.random_inputs(model, {"seq": 1000})
    assert feeds["ids"].shape == (1, 1000) and feeds["ids"].dtype == np.int32
    assert feeds["ids"].min() >= 0 and feeds["ids"].max() == 36  # 1000 draws reach the top
    assert feeds["flag"].shape == (2,) and set(np.unique(feeds["flag"])) <= {0, 1}
    again = onnx_run.random_inputs(model, {"seq": 1000})
    assert np.array_equal(feeds["ids"], again["ids"])  # deterministic
    ranged = onnx_run.random_inputs(model, ranges={"ids": (5, 7)})
    assert ranged["ids"].shape == (1, 16) and set(np.unique(ranged["ids"])) <= {5, 6}


def test_transformer_random_ids_stay_in_vocabulary(samples: Path) -> None:
    model = onnx.load(str(samples / "transformer.onnx"))
    feeds = onnx_run.random_inputs(model)
    ids = feeds["input_ids"]
    assert ids.shape == (1, 16) and ids.dtype == np.int64
    assert ids.min() >= 0 and ids.max() < 512
    assert onnx_run.gather_ranges(model) == {"input_ids": (0, 512)}


def test_unknown_dim_and_input_names_are_refused(tmp_path: Path) -> None:
    model = onnx.load(str(matmul_model(tmp_path / "m.onnx", {"w": rng_weights(8, 4)})))
    with pytest.raises(InputDataError, match="--dim seq: the model has no dimension named 'seq' "
                                             "\\(its symbolic dimensions: batch\\)"):
        onnx_run.random_inputs(model, {"seq": 3})
    with pytest.raises(InputDataError, match="--input-range y: the model has no input named 'y'"):
        onnx_run.random_inputs(model, ranges={"y": (0, 1)})
    assert onnx_run.random_inputs(model, {"batch": 3})["x"].shape == (3, 8)


@pytest.mark.parametrize("arrays, message", [
    ({"z": np.zeros((2, 8), np.float32)}, "no array for model input 'x'"),
    ({"x": np.zeros((2, 8), np.float32), "z": np.zeros(1)}, "array 'z' is not an input"),
    ({"x": np.zeros((2, 8), np.int64)}, "array 'x' is int64, the model input is float32"),
    ({"x": np.zeros(8, np.float32)}, "array 'x' has shape [8], the model input has 2 dims"),
])
def test_bad_input_files_name_the_array(tmp_path: Path, arrays: dict, message: str) -> None:
    model = onnx.load(str(matmul_model(tmp_path / "m.onnx", {"w": rng_weights(8, 4)})))
    np.savez(tmp_path / "in.npz", **arrays)
    with pytest.raises(InputDataError) as info:
        onnx_run.load_inputs(model, tmp_path / "in.npz")
    assert message in str(info.value) and str(tmp_path / "in.npz") in str(info.value)


def test_pickled_inputs_are_refused(tmp_path: Path) -> None:
    model = onnx.load(str(matmul_model(tmp_path / "m.onnx", {"w": rng_weights(8, 4)})))
    np.savez(tmp_path / "in.npz", x=np.array([{"a": 1}], dtype=object))
    with pytest.raises(InputDataError, match="not a readable .npz file"):
        onnx_run.load_inputs(model, tmp_path / "in.npz")
    np.save(tmp_path / "labels.npy", np.array([None, 1], dtype=object))
    with pytest.raises(InputDataError, match="labels.npy: not a readable .npy array"):
        onnx_run.load_labels(tmp_path / "labels.npy")


def test_shared_samples_is_the_first_axis_every_array_has() -> None:
    assert shared_samples([np.zeros((3, 2)), np.zeros(3)]) == 3
    assert shared_samples([np.zeros((3, 2)), np.zeros((4, 2))]) is None  # lengths differ
    assert shared_samples([np.zeros(3), np.float32(1.0)]) is None        # a scalar
    assert shared_samples([]) is None
