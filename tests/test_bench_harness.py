"""The peer benchmark's helpers (benchmarks/peerbench): statistics, GGUF layout, process
measurement, evaluation, synthetic model, and one small end-to-end run of the harness."""

from __future__ import annotations

import math
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import load_file

from benchmarks.peerbench import analysis, bench, evaluate, gguf_io, models, synth
from benchmarks.peerbench.measure import error_line, run_timed
from benchmarks.peerbench.tools import Config
from tests.conftest import matmul_model, rng_weights

F = TensorProto.FLOAT


def test_compare_counts_unchanged_weights_as_exact():
    a = np.array([[3.0, 4.0]], np.float32)       # power 25
    b = np.array([[1.0, 0.0, 0.0]], np.float32)  # power 1, unchanged
    new_a = np.array([[3.0, 3.0]], np.float32)   # error 1
    stats = analysis.compare({"a": a, "b": b}, {"a": new_a, "b": b.copy()},
                             lambda keys: 3 * len(list(keys)))
    assert stats.total_elements == 5 and stats.changed_elements == 2 and stats.changed_count == 1
    assert stats.coverage == pytest.approx(0.4)
    assert stats.bits_per_weight == pytest.approx(8 * 3 / 2)
    assert stats.sqnr_changed == pytest.approx(10 * math.log10(25))
    assert stats.sqnr_all == pytest.approx(10 * math.log10(26))


def test_compare_reports_unreadable_weights():
    a = np.ones((2, 2), np.float32)
    stats = analysis.compare({"a": a}, {"a": None}, lambda keys: 0, {"a": "broken"})
    assert stats.problems == ["a: broken"]
    assert stats.sqnr_all is None and stats.sqnr_changed is None and stats.bits_per_weight is None


@pytest.mark.parametrize("shape,axis", [((40, 24), 0), ((24, 40), 1), ((6, 3, 3, 3), -1),
                                        ((64, 32), 1)])
def test_gguf_rows_layout_round_trips(shape, axis):
    w = rng_weights(*shape, seed=7)
    rows = gguf_io.to_rows(w, axis)
    assert rows.shape[1] % 32 == 0
    np.testing.assert_array_equal(gguf_io.from_rows(rows, shape, axis), w)


def test_gguf_reduction_axes_follow_consumers():
    nodes = [helper.make_node("MatMul", ["x", "a"], ["h"]),
             helper.make_node("Transpose", ["b"], ["bt"], perm=[1, 0]),
             helper.make_node("MatMul", ["h", "bt"], ["h2"]),
             helper.make_node("Gemm", ["h2", "c"], ["y"], transB=1)]
    inits = [numpy_helper.from_array(rng_weights(4, 6), "a"),
             numpy_helper.from_array(rng_weights(5, 6), "b"),
             numpy_helper.from_array(rng_weights(3, 5), "c")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, [1, 4])],
                              [helper.make_tensor_value_info("y", F, [1, 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    assert gguf_io.onnx_reduction_axes(model) == {"a": 0, "b": 1, "c": 1}


def test_gguf_write_and_read_back(tmp_path):
    pytest.importorskip("gguf")
    w = rng_weights(8, 40, seed=8)
    bias = rng_weights(8, seed=9)
    path = tmp_path / "w.gguf"
    gguf_io.write_gguf(path, {"w": (w, 1), "bias": (bias, None)}, "Q8_0")
    read = gguf_io.read_gguf(path)
    back, nbytes, quantized = read["w"]
    assert quantized and back.shape == w.shape
    assert nbytes == 8 * 2 * 34  # 40 columns padded to 64: two Q8_0 blocks of 34 bytes per row
    assert np.max(np.abs(back - w)) <= np.abs(w).max() / 127
    np.testing.assert_array_equal(read["bias"][0], bias)
    assert read["bias"][2] is False


def test_error_line_picks_the_exception():
    trace = ("Traceback (most recent call last):\n  File \"x.py\", line 1\n"
             "nncf.errors.InvalidGroupSizeError: Failed to apply group size 128.\n")
    assert error_line(trace, 1) == "nncf.errors.InvalidGroupSizeError: Failed to apply group size 128."
    assert error_line("Error: model.onnx: no such file\n", 1) == "Error: model.onnx: no such file"
    assert error_line("", 2) == "exit code 2"
    assert error_line("boom\n", -9).startswith("killed by signal 9")


def test_run_timed_reports_the_child_peak_not_the_parent(tmp_path):
    ballast = np.ones(200 * 2**20, np.uint8)  # the parent holds 200 MiB
    ok = run_timed([sys.executable, "-m", "benchmarks.peerbench.launch", "json.tool", "--help"],
                   models.ROOT)
    assert ok.ok and ok.peak_rss is not None
    assert 0 < ok.peak_rss < 150 * 2**20
    bad = run_timed([sys.executable, "-m", "benchmarks.peerbench.launch", "json.tool",
                     str(tmp_path / "missing.json")], models.ROOT)
    assert not bad.ok and "missing.json" in bad.error
    assert ballast[-1] == 1


def test_logits_name_sees_through_softmax():
    def model(nodes):
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", F, [1, 3])],
                                  [helper.make_tensor_value_info("p", F, [1, 3])],
                                  [numpy_helper.from_array(np.ones(1, np.float32), "m")])
        return helper.make_model(graph)
    assert evaluate.logits_name(model([helper.make_node("Softmax", ["x"], ["p"])])) == "x"
    jax = [helper.make_node("Sub", ["x", "m"], ["s"]), helper.make_node("Exp", ["s"], ["e"]),
           helper.make_node("ReduceSum", ["e"], ["r"]), helper.make_node("Div", ["e", "r"], ["p"])]
    assert evaluate.logits_name(model(jax)) == "x"
    assert evaluate.logits_name(model([helper.make_node("Relu", ["x"], ["p"])])) == "p"


def test_output_error_of_an_intermediate_tensor(tmp_path):
    w = rng_weights(6, 4, seed=10)
    path = matmul_model(tmp_path / "m.onnx", {"w": w})
    model = onnx.load(str(path))
    feeds = {"x": rng_weights(5, 6, seed=11)}
    ref = evaluate.run_tensor(model, "h0", feeds)
    same = evaluate.output_error(ref, model, "h0", feeds)
    assert same.rel_l2 == 0 and same.top1 == 1.0
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w * 1.1, "w"))
    worse = evaluate.output_error(ref, model, "h0", feeds)
    assert worse.rel_l2 == pytest.approx(0.1, rel=1e-4)


def test_synthetic_transformer_matches_its_safetensors(tmp_path):
    size = synth.TransformerSize(d_model=32, layers=1, heads=4, d_ff=64, vocab=50)
    onnx_path, st_path = synth.build(tmp_path, size, seed=1)
    tensors = load_file(str(st_path))
    assert sum(t.size for t in tensors.values()) == size.parameters
    model = onnx.load(str(onnx_path))
    onnx.checker.check_model(model, full_check=True)
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    q = "model.layers.0.self_attn.q_proj.weight"
    np.testing.assert_array_equal(inits[q], tensors[q].T)
    np.testing.assert_array_equal(inits["model.embed_tokens.weight"],
                                  tensors["model.embed_tokens.weight"])
    assert len(onnx.load(str(onnx_path)).graph.node) > 0
    ids = np.arange(12, dtype=np.int64).reshape(2, 6)
    ref = evaluate.run_tensor(model, "logits", {"input_ids": ids})
    assert ref.shape == (2, 6, 50) and np.isfinite(ref).all()
    # heavier tail than a Gaussian: kurtosis of a projection well above 3
    w = tensors["model.layers.0.mlp.fc1.weight"].ravel()
    assert np.mean(w ** 4) / np.mean(w ** 2) ** 2 > 4


def test_model_inputs_are_deterministic_and_in_range():
    a, b = models.magika_inputs(8), models.magika_inputs(8)
    np.testing.assert_array_equal(a["bytes"], b["bytes"])
    assert a["bytes"].shape == (8, 2048) and a["bytes"].min() >= 0 and a["bytes"].max() <= 256
    img = models.image_inputs(2)["input_0"]
    assert img.shape == (2, 224, 224, 3) and img.dtype == np.float32
    assert -124 <= img.min() and img.max() <= 255 - 104


def test_harness_runs_modelpress_and_a_peer_on_a_tiny_model(tmp_path):
    src = matmul_model(tmp_path / "m.onnx", {"w1": rng_weights(64, 96, seed=12) * 0.1,
                                             "w2": rng_weights(96, 64, seed=13) * 0.1})
    case = models.ModelCase("tiny", "tiny MLP", src, None,
                            lambda: {"x": rng_weights(8, 64, seed=14)}, "random", 8)
    configs = [Config("modelpress int8", "modelpress", 8, ("quantize", "--bits", "8")),
               Config("qd", "ort_dynamic", 8, options={"per_channel": True}),
               Config("nope", "modelpress", 8, ("quantize", "--bits", "9"))]
    settings = bench.Settings(tmp_path / "work", latency_budget=0.05,
                              references={8: "modelpress int8"})
    rows, original = bench.run_case(case, "onnx", configs, settings, lambda _: None)
    mp, qd, bad = rows
    assert original.elements == 2 * 64 * 96
    for row in (mp, qd):
        assert row.status == "ok", row.notes
        assert row.stats.coverage == 1.0 and row.stats.sqnr_changed > 35
        assert 8 <= row.stats.bits_per_weight < 9
        assert set(row.latency) == {1, 0}
    # onnxruntime's dynamic mode also quantizes activations, and its int8 kernels differ by CPU
    # (u8s8 products saturate on AVX2 without VNNI): 0.02-0.07 on the machines seen here.
    assert mp.error.rel_l2 < 0.05 and qd.error.rel_l2 < 0.15
    assert mp.time_ratio == 1.0 and qd.time_ratio > 0
    assert bad.status == "failed" and "--bits" in bad.notes[0]


def test_equal_coverage_row_quantizes_exactly_the_peers_weights(tmp_path):
    from benchmarks.peerbench import coverage
    from benchmarks.peerbench.analysis import WeightStats
    from benchmarks.peerbench.measure import ProcessRun
    from benchmarks.peerbench.report import Row

    # the peer's weight has glob characters in its name and is under --min-elements (1,024
    # elements), like open_nsfw's one MatMul weight: only --include can select it
    src = matmul_model(tmp_path / "m.onnx", {"blk[0].w?": rng_weights(16, 64, seed=21) * 0.1,
                                             "w1": rng_weights(64, 96, seed=22) * 0.1})
    case = models.ModelCase("tiny", "tiny MLP", src, None,
                            lambda: {"x": rng_weights(8, 16, seed=23)}, "random", 8)
    ref = Config("mp int4", "modelpress", 4, ("quantize", "--bits", "4", "--all-layers"))
    peer = Config("ort g32", "ort_nbits", 4, options={"bits": 4, "block_size": 32})
    full = Config("gguf Q4_0", "gguf", 4, options={"type": "Q4_0"})

    def row(cfg, weights):  # a measured row as run_case leaves it
        r = Row(cfg, run=ProcessRun(1.0, None, 0))
        r.stats = WeightStats(7168, per_weight={k: (n, 1.0, 0.1) for k, n in weights.items()})
        r.stats.changed_elements = sum(weights.values())
        return r

    rows = [row(ref, {"h1": 6144}), row(peer, {"h0": 1024}), row(full, {"h0": 1024, "h1": 6144})]
    settings = bench.Settings(tmp_path / "work", latency_budget=0.05, references={4: "mp int4"})
    original = bench.OnnxOriginal(case)
    got = bench._equal_coverage_rows(rows, [ref, peer, full], case, src, original, settings, {},
                                     lambda _: None)
    assert [r.config.label for r in got] == ["mp int4", "mp int4, onnxruntime's coverage",
                                             "ort g32", "gguf Q4_0"]  # gguf changed more: none
    eq = got[1]
    assert eq.config.args == ref.args + ("--include", "blk[[]0].w[?]")
    assert eq.config.covers == ("ort g32",)
    assert eq.status == "ok", eq.notes
    assert set(eq.stats.per_weight) == {"h0"} and eq.stats.changed_elements == 1024
    assert eq.notes[0] == ("as mp int4, only the weights ort g32 changed "
                           "(--include `blk[[]0].w[?]`)")
    assert eq.error is not None and 0 < eq.error.rel_l2 < 0.3
    rows[1].stats.changed_elements = 6144  # as many as the reference: no row
    assert coverage.equal_coverage_configs(rows, ref, original.model) == []


def test_config_adds_format_arguments_for_that_format_only(tmp_path):
    config = Config("mp", "modelpress", 4, ("quantize", "--bits", "4"),
                    formats=("onnx", "safetensors"),
                    format_args={"safetensors": ("--super-block", "128")})
    onnx_cmd = config.command(tmp_path / "m.onnx", tmp_path / "o.onnx")
    st_cmd = config.command(tmp_path / "m.safetensors", tmp_path / "o.safetensors")
    assert onnx_cmd[-3:] == ["quantize", "--bits", "4"]
    assert st_cmd[-5:] == ["quantize", "--bits", "4", "--super-block", "128"]
    assert config.shown().endswith("quantize --bits 4 (+ `--super-block 128` for safetensors)")
