"""Static int8 (issue 19): `quantize --bits 8 --activations int8` writes QDQ that onnxruntime
runs as integer kernels, keeps outlier activations float by measured error, and reports
which nodes run integer and which float; refusals are one line, exit 2."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from modelpress.app.keep_float import Choice, float_weights
from modelpress.app.speed import Speed, measure_speed
from modelpress.app.static_int8 import compress_static, float_for_speed
from modelpress.core.activation_ranges import range_for
from modelpress.core.quantize.stage import Quantize
from modelpress.core.recipe import Recipe
from modelpress.formats.onnx.kernels import optimized_kernels
from modelpress.formats.onnx.node_time import clearly_slower, owner
from modelpress.formats.onnx.qdq import SLOW_REASON, build, name_nodes
from modelpress.formats.onnx.qdq_sites import find_sites, float_tensors, fold_affine

from conftest import matmul_model, ort_run, rng_weights, run_cli, write_safetensors

STATIC = ["quantize", "--bits", "8", "--activations", "int8"]


def _conv_model(path: Path) -> Path:
    """image -> Conv -> Relu -> Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal(s) * 0.3).astype(np.float32), n)
             for n, s in (("c1.w", (16, 8, 3, 3)), ("c1.b", (16,)), ("c2.w", (16, 16, 3, 3)),
                          ("c2.b", (16,)), ("fc.w", (10, 16)), ("fc.b", (10,)))]
    nodes = [helper.make_node("Conv", ["image", "c1.w", "c1.b"], ["a1"], pads=[1] * 4),
             helper.make_node("Relu", ["a1"], ["r1"]),
             helper.make_node("Conv", ["r1", "c2.w", "c2.b"], ["a2"], pads=[1] * 4),
             helper.make_node("Relu", ["a2"], ["r2"]),
             helper.make_node("GlobalAveragePool", ["r2"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"]),
             helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["logits"], transB=1)]
    graph = helper.make_graph(
        nodes, "cnn", [helper.make_tensor_value_info("image", TensorProto.FLOAT,
                                                     ["batch", 8, 12, 12])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 10])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _npz(path: Path, name: str, shape: tuple[int, ...], seed: int) -> Path:
    np.savez(path, **{name: np.random.default_rng(seed).standard_normal(shape)
                      .astype(np.float32)})
    return path


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


@pytest.fixture
def conv_case(tmp_path: Path) -> tuple[Path, Path, Path]:
    return (_conv_model(tmp_path / "cnn.onnx"),
            _npz(tmp_path / "cal.npz", "image", (16, 8, 12, 12), 1),
            _npz(tmp_path / "eval.npz", "image", (16, 8, 12, 12), 2))


@pytest.fixture
def matmul_case(tmp_path: Path) -> tuple[Path, Path, Path]:
    model = matmul_model(tmp_path / "mlp.onnx", {"w1": rng_weights(64, 96, seed=1) * 0.2,
                                                 "w2": rng_weights(96, 32, seed=2) * 0.2})
    return (model, _npz(tmp_path / "cal.npz", "x", (32, 64), 3),
            _npz(tmp_path / "eval.npz", "x", (32, 64), 4))


@pytest.mark.parametrize("case,kernel", [("conv_case", "QLinearConv"),
                                         ("matmul_case", "QLinearMatMul")])
def test_qdq_output_runs_as_integer_kernels_with_small_error(
        case: str, kernel: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    model, cal, evaluation = request.getfixturevalue(case)
    out, report = tmp_path / "q.onnx", tmp_path / "r.json"
    # tiny products can time slower in int8 than float: keep them integer to test the kernels
    result = run_cli(["compress", model, "-o", out, "--calibration", cal, "--inputs", evaluation,
                      "--report", report, "--target-error", "0.05", "--no-time-kernels", "-q",
                      *STATIC])
    assert result.exit_code == 0, result.output
    types = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= types
    kernels = optimized_kernels(out)
    assert kernels.integer.get(kernel, 0) >= 1
    data = json.loads(report.read_text())
    static = data["static_int8"]
    assert kernels.float_count == 0 and static["speed"]["kept_float_for_speed"] == []
    assert static["kernels"]["float_reasons"] == {}
    feeds = dict(np.load(evaluation))
    assert _rel(ort_run(model, feeds)[0], ort_run(out, feeds)[0]) < 0.06
    assert static["kernels"]["integer_count"] == kernels.integer_count
    assert static["search"]["error_written"] <= 0.05
    assert static["activations"]["groups"] >= 2
    assert data["evaluation"]["latency"]["after_ms"] > 0
    assert all(t["encoding"].startswith("int8 sym channel") for t in data["tensors"])
    assert len(data["tensors"]) == (3 if case == "conv_case" else 2)  # float ones too
    assert data["totals"]["file_bytes_after"] < 0.6 * data["totals"]["file_bytes_before"]


def test_untimed_runs_write_the_same_bytes(matmul_case: tuple[Path, Path, Path],
                                          tmp_path: Path) -> None:
    """--no-time-kernels: the file depends on the model and calibration alone, and the
    report says the kernels were not timed."""
    model, cal, _ = matmul_case
    outs = [tmp_path / "a.onnx", tmp_path / "b.onnx"]
    for out in outs:
        result = run_cli(["compress", model, "-o", out, "--calibration", cal, "--no-eval",
                          "--no-time-kernels", "--report", tmp_path / "r.json", "-q", *STATIC])
        assert result.exit_code == 0, result.output
    assert outs[0].read_bytes() == outs[1].read_bytes()
    speed = json.loads((tmp_path / "r.json").read_text())["static_int8"]["speed"]
    assert speed["timed"] is False and speed["float_us"] == {}


def test_markdown_report_shows_the_kernels(conv_case: tuple[Path, Path, Path],
                                           tmp_path: Path) -> None:
    model, cal, evaluation = conv_case
    result = run_cli(["compress", model, "-o", tmp_path / "q.onnx", "--calibration", cal,
                      "--no-eval", "--no-time-kernels", "--format", "markdown", *STATIC])
    assert result.exit_code == 0, result.output
    assert "| integer kernels | 4 | QLinearConv 2, " in result.output
    assert "| float Conv/MatMul/Gemm | 0 | none |" in result.output
    assert "kernels not timed (--no-time-kernels)" in result.output


def _outlier_inputs(path: Path) -> Path:
    """Inputs with rare large values (1 in 64 is 60x the rest): one int8 scale for them
    either clips those or rounds the others away; a model's output depends on both."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((32, 64)).astype(np.float32)
    x[rng.random(x.shape) < 1 / 64] *= 60.0
    np.savez(path, x=x)
    return path


def test_keep_float_search_puts_back_the_outlier_activation(tmp_path: Path) -> None:
    model = matmul_model(tmp_path / "mlp.onnx", {"w1": rng_weights(64, 96, seed=1) * 0.2,
                                                 "w2": rng_weights(96, 32, seed=2) * 0.2})
    cal = _outlier_inputs(tmp_path / "cal.npz")
    recipe = Recipe([Quantize(bits=8, activations="int8")])
    report = compress_static(model, tmp_path / "q.onnx", recipe, cal, target_error=0.03,
                             time_kernels=False)  # the error search alone
    search = report.static_int8["search"]
    assert search["error_all_int8"] > 0.03
    assert search["kept_float"][0] == "x", search
    assert search["met"] and search["error_written"] <= 0.03
    feeds = dict(np.load(cal))
    assert _rel(ort_run(model, feeds)[0], ort_run(tmp_path / "q.onnx", feeds)[0]) <= 0.03
    reasons = report.static_int8["nodes"]["float"]
    assert list(reasons.values()) == ["input 'x' kept float"]
    assert report.static_int8["nodes"]["integer"]  # the second MatMul still runs integer


@pytest.mark.parametrize("args,message", [
    (["quantize", "--bits", "8", "--activations", "int8"],
     "quantize --activations int8 needs --calibration FILE.npz"),
    (["--calibration", "{cal}", "quantize", "--bits", "4", "--activations", "int8"],
     "quantize: --activations int8 needs --bits 8"),
    (["--calibration", "{cal}", "prune", "--sparsity", "0.5", *STATIC],
     "quantize --activations int8 is the whole recipe"),
    (["--calibration", "{cal}", "--target-size", "50%", *STATIC],
     "--target-size does not apply to quantize --activations int8"),
])
def test_refusals_are_one_line_exit_2(args: list[str], message: str,
                                      conv_case: tuple[Path, Path, Path],
                                      tmp_path: Path) -> None:
    model, cal, _ = conv_case
    out = tmp_path / "q.onnx"
    result = run_cli(["compress", model, "-o", out,
                      *[a.format(cal=cal) for a in args]])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert not out.exists()


def test_safetensors_and_batch_are_refused(tmp_path: Path,
                                           conv_case: tuple[Path, Path, Path]) -> None:
    model, cal, _ = conv_case
    weights = write_safetensors(tmp_path / "w.safetensors",
                                {"w": rng_weights(64, 64)})
    result = run_cli(["compress", weights, "-o", tmp_path / "o.safetensors", "--calibration",
                      cal, *STATIC])
    assert result.exit_code == 2
    assert "needs an ONNX model" in result.output
    (tmp_path / "out").mkdir()
    result = run_cli(["compress", model, model.parent / "eval.npz", "-o", tmp_path / "out",
                      "--calibration", cal, *STATIC])
    assert result.exit_code == 2
    assert "batch mode does not run models" in result.output


def test_batch_norm_arithmetic_folds_and_thin_convs_stay_float(tmp_path: Path) -> None:
    """Conv -> Sub/Mul/Add by per-channel constants (a batch norm exported as arithmetic)
    folds into the Conv with the same outputs; a Conv on 3 input channels stays float and
    says why."""
    rng = np.random.default_rng(3)
    consts = {n: rng.uniform(0.5, 1.5, (1, 16, 1, 1)).astype(np.float32)
              for n in ("mean", "inv", "beta")}
    inits = [numpy_helper.from_array(rng.standard_normal((16, 3, 3, 3)).astype(np.float32), "w"),
             *[numpy_helper.from_array(v, n) for n, v in consts.items()]]
    nodes = [helper.make_node("Conv", ["image", "w"], ["c"]),
             helper.make_node("Sub", ["c", "mean"], ["s"]),
             helper.make_node("Mul", ["s", "inv"], ["m"]),
             helper.make_node("Add", ["m", "beta"], ["y"])]
    graph = helper.make_graph(nodes, "bn", [helper.make_tensor_value_info(
        "image", TensorProto.FLOAT, [2, 3, 8, 8])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    feeds = {"image": rng.standard_normal((2, 3, 8, 8)).astype(np.float32)}
    before = ort.InferenceSession(model.SerializeToString()).run(None, feeds)[0]
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    assert fold_affine(folded) == 3
    assert [n.op_type for n in folded.graph.node] == ["Conv"]
    after = ort.InferenceSession(folded.SerializeToString()).run(None, feeds)[0]
    np.testing.assert_allclose(after, before, rtol=1e-5, atol=1e-5)
    sites = find_sites(folded, float_tensors(folded))
    assert sites.tensors == []  # its only product cannot run integer: nothing to quantize
    result = build(folded, sites, {}, set())
    assert result.float_reasons == {
        result.model.graph.node[0].name: "3 input channels per group: int8 Conv is slower "
                                         "than float below 8"}


def test_float_products_store_int8_weights_that_onnxruntime_folds(tmp_path: Path) -> None:
    """A MatMul that runs float (its input kept float) still stores its weight as int8:
    Cast x per-channel scale, which onnxruntime folds back into a float constant at load
    (no Cast or DequantizeLinear left in the graph it runs); outputs match the int8 values."""
    model_path = matmul_model(tmp_path / "mlp.onnx", {"w1": rng_weights(64, 96, seed=1) * 0.2,
                                                      "w2": rng_weights(96, 32, seed=2) * 0.2})
    model = onnx.load(str(model_path))
    name_nodes(model)
    sites = find_sites(model, float_tensors(model))
    products = [n.name for n in model.graph.node if n.op_type == "MatMul"]
    everything = set(sites.groups)
    plain = build(model, sites, {}, everything)
    stored = build(model, sites, {}, everything, weight_only=frozenset(products))
    assert sorted(stored.weight_only) == sorted(products)
    assert {i.data_type for i in stored.model.graph.initializer if i.name.startswith("w")} == \
        {TensorProto.INT8, TensorProto.FLOAT}  # codes int8, scales float
    onnx.save(plain.model, str(tmp_path / "plain.onnx"))
    onnx.save(stored.model, str(tmp_path / "stored.onnx"))
    plain_size = (tmp_path / "plain.onnx").stat().st_size
    assert (tmp_path / "stored.onnx").stat().st_size < 0.3 * plain_size
    kernels = optimized_kernels(tmp_path / "stored.onnx")
    assert kernels.float_count == 2
    assert kernels.conversions == {}
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.optimized_model_filepath = str(Path(tmp) / "opt.onnx")
        ort.InferenceSession(str(tmp_path / "stored.onnx"), options,
                             providers=["CPUExecutionProvider"])
        ran = {n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node}
    assert "Cast" not in ran and "DequantizeLinear" not in ran
    feeds = dict(np.load(_npz(tmp_path / "x.npz", "x", (8, 64), 5)))
    x = feeds["x"].astype(np.float64)
    w = {}
    for name in ("w1", "w2"):
        codes, scale, axis, _ = stored.stored[name]
        inits = {i.name: numpy_helper.to_array(i) for i in stored.model.graph.initializer}
        assert np.abs(inits[codes]).max() == 127  # full range: no integer kernel reads it
        w[name] = inits[codes].astype(np.float64) * inits[scale]
    expected = x @ w["w1"] @ w["w2"]
    got = ort_run(tmp_path / "stored.onnx", feeds)[0]
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
    assert _rel(ort_run(model_path, feeds)[0], got) < 0.02


def test_nodes_timed_slower_stay_float_only_within_the_error_target(tmp_path: Path) -> None:
    """The speed pass: each integer node measured slower goes back to float (largest loss
    first) when the measured error stays within the target; `build` then keeps it float and
    says why; the timings cover every product."""
    model_path = _conv_model(tmp_path / "cnn.onnx")
    model = onnx.load(str(model_path))
    name_nodes(model)
    sites = find_sites(model, float_tensors(model))
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    choice = Choice([], {}, 0.01, 0.01, 0.02)
    errors = {frozenset([convs[0]]): 0.015, frozenset([convs[0], convs[1]]): 0.03}
    speed = Speed(slow=[convs[0], convs[1]])
    kept = float_for_speed(speed, choice, lambda keep, methods, slow: errors[slow], 0.02)
    assert kept == {convs[0]} and choice.error == 0.015 and choice.runs == 2
    result = build(model, sites, {g: range_for(-3.0, 3.0, "minmax") for g in sites.groups},
                   set(), slow=kept)
    assert result.float_reasons == {convs[0]: SLOW_REASON}
    assert convs[1] in result.integer
    timed = measure_speed(model, sites, {g: range_for(-3.0, 3.0, "minmax")
                                         for g in sites.groups}, set(),
                          {"image": np.ones((1, 8, 12, 12), np.float32)}, tmp_path)
    products = {n.name for n in model.graph.node if n.op_type in ("Conv", "Gemm")}
    assert set(timed.float_us) == products and set(timed.integer_us) == products
    assert all(v > 0 for v in timed.float_us.values())
    assert set(timed.weight_only) | set(timed.weight_only_slower) == products
    assert set(timed.slow) <= products


def test_profile_names_and_margins() -> None:
    assert owner("conv_1:0_nchwc", ["conv_1", "conv_10", "conv"]) == "conv_1"
    assert owner("conv_10", ["conv_1", "conv_10"]) == "conv_10"
    assert owner("conv_12", ["conv_1"]) is None
    assert clearly_slower([12, 12, 12, 30], [10, 10, 10, 10])
    assert not clearly_slower([10.5, 10.5, 10.5], [10, 10, 10])  # within the 10% margin
    assert not clearly_slower([30, 9, 9, 30, 9], [10, 10, 10, 10, 10])  # not in most rounds


def test_float_weights_come_back_only_as_far_as_the_target_needs() -> None:
    """When the written model misses the target with its activations chosen, float nodes get
    their float weights back, the most costly first, each only if the error drops."""
    cost = {"a": 0.004, "b": 0.001, "c": 0.0}

    def measure(int8: frozenset[str]) -> float:
        return 0.002 + sum(cost[n] for n in int8)

    counter = [0]
    kept, error = float_weights(["a", "b", "c"], measure(frozenset(cost)), 0.004, measure,
                                counter)
    assert kept == {"b", "c"} and error == pytest.approx(0.003) and counter[0] == 3
    kept, error = float_weights(["a", "b", "c"], measure(frozenset(cost)), 0.0025, measure,
                                [0])
    assert kept == {"c"} and error == pytest.approx(0.002)
