"""Activation ranges for static int8 (issue 19): histograms, the four clip methods on known
distributions, collecting histograms from onnxruntime, fake quantization and the
per-tensor choice of method by measured output error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from modelpress.core.activation_ranges import (METHODS, ActivationRange, Histogram,
                                               NonFiniteError, expected_error, range_for,
                                               ranges)
from modelpress.core.errors import InputDataError
from modelpress.formats.onnx.activation_stats import collect, collect_stats, matmul_inputs
from modelpress.formats.onnx.fake_quant import FakeQuantRunner, fake_quant
from modelpress.formats.onnx.range_choice import choose

from conftest import ort_run


def _counts_at(hist: Histogram, exponent: int) -> dict[int, int]:
    """The histogram's counts on the lattice of bin width 2**exponent (coarser or equal)."""
    index = (hist.start + np.arange(hist.bins)) >> (exponent - hist.exponent)
    out: dict[int, int] = {}
    for i, c in zip(index.tolist(), hist.counts.tolist()):
        if c:
            out[i] = out.get(i, 0) + c
    return out


def test_merged_histograms_equal_the_histogram_of_the_concatenation() -> None:
    rng = np.random.default_rng(0)
    parts = [rng.normal(0, 0.01, 5000), rng.normal(3, 2, 5000), rng.uniform(-40, -39, 100)]
    merged = Histogram(name="x")
    for part in parts:
        merged.merge(Histogram(name="x").update(part))
    streamed = Histogram(name="x")
    for part in parts:
        streamed.update(part)
    whole = Histogram(name="x").update(np.concatenate(parts))
    assert merged.count == whole.count == 10100
    assert (merged.min, merged.max) == (whole.min, whole.max)
    e = max(merged.exponent, whole.exponent, streamed.exponent)
    assert _counts_at(merged, e) == _counts_at(whole, e) == _counts_at(streamed, e)
    # resolution follows the span: the occupied bins are at least half of them
    occupied = np.flatnonzero(whole.counts)
    assert occupied[-1] - occupied[0] + 1 > whole.bins // 2


def test_gaussian_with_outliers_is_clipped_below_its_max() -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal(100_000)
    x[:4] = [-30.0, -22.0, 25.0, 28.0]  # outliers: fewer than 0.005% at each end
    hist = Histogram().update(x)
    found = ranges(hist)
    full = found["minmax"].bounds
    for method in ("percentile", "entropy"):
        lo, hi = found[method].bounds
        assert hi < 0.5 * full[1] and lo > 0.5 * full[0], method
    lo, hi = ranges(hist, percentile=99.0)["percentile"].bounds
    assert 2.4 < hi < 2.8 and -2.8 < lo < -2.4  # the 0.5% and 99.5% points of N(0, 1)


def test_mse_clips_a_heavy_tail_and_has_the_least_expected_error() -> None:
    x = np.random.default_rng(2).laplace(size=100_000)
    hist = Histogram().update(x)
    found = ranges(hist)
    assert found["mse"].bounds[1] < 0.95 * found["minmax"].bounds[1]
    errors = {m: expected_error(hist, g) for m, g in found.items()}
    assert errors["mse"] <= 1.001 * min(errors.values())
    # the histogram's expected error is the error measured on the values themselves
    measured = np.mean((found["mse"].fake(x) - x) ** 2)
    assert errors["mse"] == pytest.approx(measured, rel=0.02)


def test_uniform_data_keeps_about_its_whole_range() -> None:
    x = np.random.default_rng(3).uniform(-1, 3, 100_000)
    for method, grid in ranges(Histogram().update(x)).items():
        lo, hi = grid.bounds
        assert lo <= -0.97 and hi >= 2.9, method


@pytest.mark.parametrize("lo, hi", [(-1.3, 2.7), (2.0, 5.0), (-5.0, -0.5), (0.0, 1.0)])
def test_zero_is_exactly_representable(lo: float, hi: float) -> None:
    x = np.random.default_rng(4).uniform(lo, hi, 10_000)
    for symmetric in (False, True):
        for grid in ranges(Histogram().update(x), symmetric=symmetric).values():
            assert grid.scale > 0 and grid.qmin <= grid.zero_point <= grid.qmax
            assert grid.fake(np.zeros(3)).tolist() == [0.0, 0.0, 0.0]
            assert grid.signed is symmetric and (grid.zero_point == 0 or not symmetric)
            assert grid.bounds[0] <= 0 <= grid.bounds[1]


def test_constant_and_all_zero_tensors_get_valid_ranges() -> None:
    for value in (0.0, 3.5, -2.0):
        found = ranges(Histogram(name="c").update(np.full(100, value)))
        assert set(found) == set(METHODS)
        for grid in found.values():
            assert grid.scale > 0
            assert grid.fake(np.array([value]))[0] == pytest.approx(value, abs=1e-6)


def test_nan_or_inf_is_one_error_naming_the_tensor() -> None:
    for bad in (np.nan, np.inf):
        with pytest.raises(NonFiniteError, match="activation 'blk.out' holds NaN or Inf"):
            Histogram(name="blk.out").update(np.array([1.0, bad]))
    with pytest.raises(InputDataError, match="no calibration values"):
        ranges(Histogram(name="empty"))


def test_range_for_matches_onnxruntime_quantize_linear(tmp_path: Path) -> None:
    grid = range_for(-0.7, 2.3, "minmax")
    x = np.linspace(-1.5, 3.0, 1001).astype(np.float32)
    qdq = _qdq_model(grid)
    onnx.save(qdq, str(tmp_path / "qdq.onnx"))
    y = ort_run(tmp_path / "qdq.onnx", {"x": x}, exact=True)[0]
    np.testing.assert_array_equal(y, grid.fake(x))


def _qdq_model(grid: ActivationRange) -> onnx.ModelProto:
    nodes = [helper.make_node("Identity", ["x"], ["t"])]
    graph = helper.make_graph(nodes, "q", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [None])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, [None])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model = fake_quant(model, {"t": grid})
    model.graph.node.append(helper.make_node("Identity", [model.graph.node[-1].output[0]],
                                             ["y"]))
    return model


def _tiny() -> onnx.ModelProto:
    """x [batch, 8] -> MatMul W1 -> Relu -> MatMul W2 -> y [batch, 4]."""
    rng = np.random.default_rng(5)
    w1 = rng.standard_normal((8, 16)).astype(np.float32)
    w2 = rng.standard_normal((16, 4)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"])]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save(model, str(path))
    return path


def test_collect_matches_numpy_on_the_tensors(tmp_path: Path) -> None:
    model = _tiny()
    path = _save(model, tmp_path / "tiny.onnx")
    x = np.random.default_rng(6).standard_normal((20, 8)).astype(np.float32)
    np.savez(tmp_path / "cal.npz", x=x)
    names = matmul_inputs(model)
    assert names == ["x", "r"]
    stats = collect_stats(path, model, tmp_path / "cal.npz", names, channels=["r", "h"],
                          per_run=3)
    h = x @ numpy_helper.to_array(model.graph.initializer[0])
    r = np.maximum(h, 0)
    for name, value in (("x", x), ("r", r)):
        hist = stats.histograms[name]
        assert hist.count == value.size and int(hist.counts.sum()) == value.size
        assert hist.min == pytest.approx(value.min(), abs=1e-5)
        assert hist.max == pytest.approx(value.max(), abs=1e-5)
    np.testing.assert_allclose(stats.absmax["h"], np.abs(h).max(axis=0), rtol=1e-5)
    assert set(collect(path, model, tmp_path / "cal.npz", ["r"])) == {"r"}


def test_collect_names_the_tensor_and_file_on_nan(tmp_path: Path) -> None:
    model = _tiny()
    model.graph.node.insert(1, helper.make_node("Log", ["h"], ["logh"]))
    model.graph.output.append(helper.make_tensor_value_info("logh", TensorProto.FLOAT, None))
    path = _save(model, tmp_path / "log.onnx")
    np.savez(tmp_path / "cal.npz", x=np.random.default_rng(7).standard_normal((4, 8)).astype(
        np.float32))
    with pytest.raises(NonFiniteError, match=r"cal\.npz: activation 'logh' holds NaN"):
        collect(path, model, tmp_path / "cal.npz", ["logh"])


def test_fake_quant_runner_switches_pairs_and_matches_fake_quant(tmp_path: Path) -> None:
    model = _tiny()
    path = _save(model, tmp_path / "tiny.onnx")
    x = np.random.default_rng(8).standard_normal((32, 8)).astype(np.float32)
    np.savez(tmp_path / "cal.npz", x=x)
    hists = collect(path, model, tmp_path / "cal.npz", ["x", "r"])
    grids = {n: ranges(h, bits=4)["minmax"] for n, h in hists.items()}
    runner = FakeQuantRunner(path, model, ["x", "r"], {"x": x})
    reference = ort_run(path, {"x": x}, exact=True)[0]
    np.testing.assert_allclose(runner.outputs({})["y"], reference, rtol=1e-6)
    fixed = _save(fake_quant(model, grids), tmp_path / "fq.onnx")
    onnx.checker.check_model(onnx.load(str(fixed)))
    expected = ort_run(fixed, {"x": x}, exact=True)[0]
    np.testing.assert_allclose(runner.outputs(grids)["y"], expected, rtol=1e-5, atol=1e-5)
    w1, w2 = (numpy_helper.to_array(t) for t in model.graph.initializer)
    by_hand = grids["r"].fake(np.maximum(grids["x"].fake(x) @ w1, 0)) @ w2
    np.testing.assert_allclose(expected, by_hand, rtol=1e-4, atol=1e-4)
    assert not np.allclose(expected, reference, rtol=1e-3)  # 4-bit ranges do change it


def test_choose_is_no_worse_than_any_single_method(tmp_path: Path) -> None:
    model = _tiny()
    path = _save(model, tmp_path / "tiny.onnx")
    rng = np.random.default_rng(9)
    x = rng.standard_normal((64, 8)).astype(np.float32)
    x[0, 0] = 40.0  # an outlier sample: min/max is not the best for x
    np.savez(tmp_path / "cal.npz", x=x)
    hists = collect(path, model, tmp_path / "cal.npz", ["x", "r"])
    candidates = {n: ranges(h, bits=4) for n, h in hists.items()}
    choice = choose(path, model, tmp_path / "cal.npz", candidates, max_runs=9)
    assert choice.runs <= 9 and set(choice.uniform) == set(METHODS)
    assert choice.error <= min(choice.uniform.values())
    assert set(choice.chosen) == {"x", "r"}


def test_exact_zeros_do_not_pull_the_clip_in() -> None:
    """After a ReLU half the values are exactly 0.0, which the grid holds exactly: left in,
    their spike made the KL search clip a ReLU'd N(0, 1) at about 2."""
    x = np.maximum(np.random.default_rng(10).standard_normal(200_000), 0)
    hist = Histogram().update(x[:100_000]).merge(Histogram().update(x[100_000:]))
    assert hist.zeros == np.count_nonzero(x == 0)
    found = ranges(hist)
    for method in ("entropy", "mse"):
        assert found[method].bounds[1] > 0.8 * x.max(), method
        assert found[method].zero_point == 0
    errors = {m: expected_error(hist, g) for m, g in found.items()}
    assert errors["mse"] <= 1.001 * min(errors.values())
    assert errors["mse"] == pytest.approx(np.mean((found["mse"].fake(x) - x) ** 2), rel=0.02)
