"""Which ONNX weights the stages take: LSTM, GRU and RNN weights (W, R) by every stage that
makes sense for them, the samples that show it (int8 at 0.30x or less), and a note for
each other large tensor left alone."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from modelpress import (Cast, Cluster, Factorize, Options, Prune, Quantize, Recipe, compress,
                        decompress)
from modelpress.formats import open_model

from conftest import SAMPLES, ort_run, rng_weights, run_cli
from test_onnx_io import dequantized, optimized_ops

T, B, I, H = 7, 2, 48, 40
WEIGHTS = {"lstm.W": (2, 4 * H, I), "lstm.R": (2, 4 * H, H), "gru.W": (1, 3 * H, 2 * H),
           "gru.R": (1, 3 * H, H), "rnn.W": (1, H, H), "rnn.R": (1, H, H)}
KEPT = ("lstm.B", "lstm.h0", "lstm.c0", "gru.B", "rnn.B")   # biases and initial states


def recurrent_model(path: Path) -> Path:
    """A bidirectional LSTM (with initial states), a GRU and a plain RNN in a row."""
    rng = np.random.default_rng(0)
    arrays = {name: rng.uniform(-0.15, 0.15, shape).astype(np.float32)
              for name, shape in WEIGHTS.items()}
    arrays.update({"lstm.B": rng.uniform(-0.1, 0.1, (2, 8 * H)),
                   "lstm.h0": rng.uniform(-0.5, 0.5, (2, B, H)),
                   "lstm.c0": rng.uniform(-0.5, 0.5, (2, B, H)),
                   "gru.B": rng.uniform(-0.1, 0.1, (1, 6 * H)),
                   "rnn.B": rng.uniform(-0.1, 0.1, (1, 2 * H)),
                   "merge": np.array([T, B, 2 * H]), "squeeze": np.array([1])})
    inits = [numpy_helper.from_array(np.asarray(a, np.int64 if a.dtype.kind == "i" else np.float32),
                                     n) for n, a in arrays.items()]
    nodes = [
        helper.make_node("LSTM", ["x", "lstm.W", "lstm.R", "lstm.B", "", "lstm.h0", "lstm.c0"],
                         ["lstm.Y"], hidden_size=H, direction="bidirectional"),
        helper.make_node("Transpose", ["lstm.Y"], ["lstm.T"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["lstm.T", "merge"], ["lstm.out"]),
        helper.make_node("GRU", ["lstm.out", "gru.W", "gru.R", "gru.B"], ["gru.Y"], hidden_size=H),
        helper.make_node("Squeeze", ["gru.Y", "squeeze"], ["gru.out"]),
        helper.make_node("RNN", ["gru.out", "rnn.W", "rnn.R", "rnn.B"], ["y", "h"], hidden_size=H),
    ]
    graph = helper.make_graph(
        nodes, "recurrent", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [T, B, I])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [T, 1, B, H]),
         helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, B, H])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def test_roles_of_recurrent_weights(tmp_path: Path) -> None:
    store = open_model(recurrent_model(tmp_path / "m.onnx"))
    for name in WEIGHTS:
        info = store.tensors[name]
        assert (info.role, info.channel_axis, info.block_axis, info.block_span) == \
            (name.split(".")[0].upper(), 1, 2, 1), name
    assert not any(store.tensors[name].weight_like for name in KEPT)


STAGES = {
    "int8": [Quantize(bits=8)],
    "int4": [Quantize(bits=4)],
    "int4-channel-float": [Quantize(bits=4, granularity="channel", scale_bits=0)],
    "fp16": [Cast(dtype="fp16")],
    "fp8-channel": [Cast(dtype="fp8-e4m3", scale="channel")],
    "prune": [Prune(sparsity=0.5)],
    "2:4-int4": [Prune(pattern="2:4"), Quantize(bits=4)],
    "cluster-channel": [Cluster(bits=4, per_channel=True)],
    "prune-cluster": [Prune(sparsity=0.5), Cluster(bits=3)],
}
# Worst output error allowed per recipe (random weights, 7 steps through three layers;
# pruning half of random weights changes the outputs by a third).
LIMITS = {"int8": 0.01, "int4": 0.1, "int4-channel-float": 0.1, "fp16": 0.001,
          "fp8-channel": 0.05, "prune": 0.5, "2:4-int4": 0.6, "cluster-channel": 0.1,
          "prune-cluster": 0.5}


@pytest.mark.parametrize("recipe", sorted(STAGES))
def test_every_stage_compresses_w_and_r_and_the_output_runs(tmp_path: Path, recipe: str) -> None:
    src, dst = recurrent_model(tmp_path / "m.onnx"), tmp_path / "o.onnx"
    report = compress(src, dst, Recipe(STAGES[recipe]), Options(min_elements=1))
    assert sorted(r.name for r in report.rows) == sorted(WEIGHTS)
    model = onnx.load(str(dst))
    onnx.checker.check_model(model, full_check=True)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    original = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(src)).graph.initializer}
    for name in KEPT:
        np.testing.assert_array_equal(inits[name], original[name])
    store = open_model(dst)
    for name in WEIGHTS:
        if name not in inits:  # decoded by nodes (a pruned-only weight stays dense)
            expected = store.decode(name).decode()
            np.testing.assert_array_equal(dequantized(dst, name), expected, err_msg=name)
    x = {"x": rng_weights(T, B, I, seed=3)}
    want, got = ort_run(src, x), ort_run(dst, x)
    errors = [np.linalg.norm(b - a) / np.linalg.norm(a) for a, b in zip(want, got)]
    assert all(np.isfinite(g).all() for g in got)
    assert max(errors) < LIMITS[recipe], errors
    dense = tmp_path / "dense.onnx"
    decompress(dst, dense)
    np.testing.assert_allclose(ort_run(dense, x)[0], got[0], rtol=1e-5, atol=1e-6)


def test_decode_chains_fold_at_load(tmp_path: Path) -> None:
    src, dst = recurrent_model(tmp_path / "m.onnx"), tmp_path / "o.onnx"
    compress(src, dst, Recipe([Quantize(bits=8)]), Options(min_elements=1))
    assert sorted(optimized_ops(dst, tmp_path)) == ["GRU", "LSTM", "RNN", "Reshape", "Squeeze",
                                                    "Transpose"]


def test_lowrank_leaves_recurrent_weights_with_a_reason(tmp_path: Path) -> None:
    src = recurrent_model(tmp_path / "m.onnx")
    report = compress(src, tmp_path / "o.onnx", Recipe([Factorize(rank_ratio=0.25)]),
                      Options(min_elements=1))
    assert not report.rows
    assert ("lstm.W: lowrank left it as is (it is an LSTM weight [directions, gates x hidden, "
            "inputs]; lowrank factors 2-D matrices and the op takes its weights whole: use "
            "quantize, cast, prune or cluster)") in report.notes


def _scatter_model(path: Path) -> Path:
    """A large table read only by ScatterND, a large 1-D offset, and a MatMul weight."""
    table, offset, weight = rng_weights(80, 80), rng_weights(80 * 80), rng_weights(80, 80, seed=1)
    nodes = [helper.make_node("ScatterND", ["table", "index", "x"], ["t"]),
             helper.make_node("MatMul", ["t", "w"], ["m"]),
             helper.make_node("Reshape", ["m", "flat"], ["f"]),
             helper.make_node("Add", ["f", "offset"], ["y"])]
    inits = [numpy_helper.from_array(table, "table"), numpy_helper.from_array(weight, "w"),
             numpy_helper.from_array(offset, "offset"),
             numpy_helper.from_array(np.array([[0]], np.int64), "index"),
             numpy_helper.from_array(np.array([-1], np.int64), "flat")]
    graph = helper.make_graph(nodes, "scatter",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 80])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [6400])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, str(path))
    return path


def test_large_tensors_left_alone_get_a_note(tmp_path: Path) -> None:
    src = _scatter_model(tmp_path / "m.onnx")
    report = compress(src, tmp_path / "o.onnx", Recipe([Quantize(bits=8)]))
    assert [r.name for r in report.rows] == ["w"]
    assert [n for n in report.notes if "left as is" in n] == [
        "table: left as is, 6,400 elements (ScatterND input 0: not a weight input of a known "
        "op; --include with --take-all-named changes it)",
        "offset: left as is, 6,400 elements (it is 1-D: a bias, norm or table; stages change "
        "tensors of 2 or more dims unless named; --include with --take-all-named changes it)"]
    # A recipe that names its tensors passes over the others by choice: no note.
    named = compress(src, tmp_path / "o2.onnx", Recipe([Quantize(bits=8, include=("w",))]))
    assert not [n for n in named.notes if "left as is" in n]
    taken = compress(src, tmp_path / "o3.onnx",
                     Recipe([Quantize(bits=8, include=("table",), take_all_named=True)]))
    assert [r.name for r in taken.rows] == ["table"]


@pytest.mark.parametrize("model", ["mlp", "cnn", "transformer"])
def test_sample_models_have_no_large_tensor_left_alone(tmp_path: Path, model: str) -> None:
    report = compress(SAMPLES / f"{model}.onnx", tmp_path / "o.onnx", Recipe([Quantize(bits=8)]))
    assert not [n for n in report.notes if "left as is" in n]


@pytest.mark.parametrize("model, inputs_name", [("mobilenet", "image"), ("recurrent", "features")])
def test_int8_samples_at_most_0_30x_with_output_error_below_0_02(tmp_path: Path, model: str,
                                                                  inputs_name: str) -> None:
    src, dst, report = SAMPLES / f"{model}.onnx", tmp_path / "o.onnx", tmp_path / "r.json"
    inputs = SAMPLES / f"{model}_test_inputs.npz"
    result = run_cli(["compress", src, "-o", dst, "--inputs", inputs, "--report", report,
                      "--quiet", "quantize", "--bits", "8"])
    assert result.exit_code == 0, result.output
    assert dst.stat().st_size <= 0.30 * src.stat().st_size
    evaluation = json.loads(report.read_text())["evaluation"]
    assert evaluation["status"] == "ok" and evaluation["output_error"] < 0.02
    with np.load(inputs) as data:
        got = ort_run(dst, {inputs_name: data[inputs_name]})[0]
    assert np.isfinite(got).all()
    changed = {row["name"] for row in json.loads(report.read_text())["tensors"]}
    weights = {n for n, i in open_model(src).tensors.items() if i.weight_like and i.size >= 4096}
    assert changed == weights
