"""quantize --method gptq: input moments collected by running the model, GPTQ rounding.

The im2col rows are checked against onnxruntime's own Conv; GPTQ against
plain rounding on the output error onnxruntime computes (inputs other than
the calibration ones), on every layout with the same stored bytes; pruned
weights stay zero; refusals; deterministic output; the memory limits.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from threadpoolctl import threadpool_limits

from modelpress import Quantize, Recipe, compress
from modelpress.core.encoded import Dense, Quantized, Sparse
from modelpress.core.errors import RecipeError
from modelpress.core.pipeline import Options
from modelpress.core.scalecode import ScaleCode
from modelpress.core.lowrank import Factorize
from modelpress.core.prune import Prune
from modelpress.core.quantize import gptq, gridsearch, optq
from modelpress.core.quantize.gptq import element_grid, gptq_codes
from modelpress.core.tensorinfo import InputStats, SecondMoments, TensorInfo
from modelpress.formats import open_model
from modelpress.formats.onnx import calibrate
from modelpress.formats.onnx.moments import ConvGeometry, Sums, conv_rows, shrunk_moments

from conftest import ort_run, run_cli, samples  # noqa: F401 (fixture)

K, N, HIDDEN = 64, 16, 128


def _save(path: Path, nodes, inputs, outputs, weights: dict[str, np.ndarray]) -> Path:
    graph = helper.make_graph(nodes, "g", inputs, outputs,
                              [numpy_helper.from_array(w, n) for n, w in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _mlp(path: Path, rank: int | None = None) -> Path:
    """x [batch, K] -> MatMul [K, HIDDEN] -> Relu -> Gemm (transB) [N, HIDDEN]; with
    `rank`, both weights are products of two random factors of that rank."""
    rng = np.random.default_rng(0)
    weights = {"w1": rng.standard_normal((K, HIDDEN)), "w2": rng.standard_normal((N, HIDDEN))}
    if rank:
        weights = {n: rng.standard_normal((w.shape[0], rank)) @ rng.standard_normal(
            (rank, w.shape[1])) / np.sqrt(rank) for n, w in weights.items()}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "w2"], ["y"], transB=1)]
    return _save(path, nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", K])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", N])],
                 {n: (w / 8).astype(np.float32) for n, w in weights.items()})


def _mlp_inputs(samples: int, seed: int) -> dict[str, np.ndarray]:
    """Correlated inputs (a random mixing of fewer sources): what GPTQ exploits."""
    mix = np.random.default_rng(99).standard_normal((K // 2, K)).astype(np.float32)
    z = np.random.default_rng(seed).standard_normal((samples, K // 2)).astype(np.float32)
    return {"x": z @ mix + 0.5}


def _cnn(path: Path) -> Path:
    """A full, a depthwise (stride 2, SAME_UPPER) and a grouped (dilation 2) Conv."""
    rng = np.random.default_rng(1)
    weights = {"full": rng.standard_normal((16, 4, 3, 3)),
               "depth": rng.standard_normal((16, 1, 3, 3)),
               "grouped": rng.standard_normal((8, 4, 3, 3))}
    weights = {n: (w / 6).astype(np.float32) for n, w in weights.items()}
    nodes = [helper.make_node("Conv", ["x", "full"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["b"]),
             helper.make_node("Conv", ["b", "depth"], ["c"], group=16, strides=[2, 2],
                              auto_pad="SAME_UPPER"),
             helper.make_node("Conv", ["c", "grouped"], ["y"], group=4, dilations=[2, 2],
                              pads=[2, 2, 2, 2])]
    return _save(path, nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                             ["b", 4, 12, 12])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, list("nchw"))], weights)


def _cnn_inputs(samples: int, seed: int) -> dict[str, np.ndarray]:
    """Smooth images: neighbouring pixels correlate, as in real ones."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((samples, 4, 14, 14)).astype(np.float32)
    return {"x": (x[:, :, 1:-1, 1:-1] + x[:, :, :-2, 1:-1] + x[:, :, 2:, 2:]) / 2}


def _output_error(src: Path, dst: Path, feeds: dict[str, np.ndarray]) -> float:
    reference = ort_run(src, feeds, exact=True)[0]
    out = ort_run(dst, feeds, exact=True)[0]
    return float(np.linalg.norm(out - reference) / np.linalg.norm(reference))


def _compare(tmp_path: Path, src: Path, inputs, stages, min_elements: int = 16,
             **quantize) -> dict[str, tuple[float, int, object]]:
    """rtn (no calibration) and gptq (calibrated): output error on other inputs, file size,
    report."""
    np.savez(tmp_path / "cal.npz", **inputs(64, seed=1))
    feeds = inputs(32, seed=2)
    options = Options(min_elements=min_elements)
    found = {}
    for method in ("rtn", "gptq"):
        dst = tmp_path / f"{method}.onnx"
        recipe = Recipe([*stages, Quantize(method=method, **quantize)])
        report = compress(src, dst, recipe, options,
                          calibration=str(tmp_path / "cal.npz") if method == "gptq" else None)
        found[method] = (_output_error(src, dst, feeds), dst.stat().st_size, report)
    return found


@pytest.mark.parametrize("bits", [4, 8])
def test_gptq_lowers_the_output_error_of_matmul_and_gemm_layers(tmp_path: Path, bits: int) -> None:
    found = _compare(tmp_path, _mlp(tmp_path / "mlp.onnx"), _mlp_inputs, [], bits=bits)
    assert found["gptq"][1] == found["rtn"][1]
    assert found["gptq"][0] < 0.8 * found["rtn"][0], found
    assert "--calibration: 2 of 2 quantized tensors rounded by GPTQ" in found["gptq"][2].notes


def test_gptq_lowers_the_output_error_of_full_depthwise_and_grouped_convs(tmp_path: Path) -> None:
    found = _compare(tmp_path, _cnn(tmp_path / "cnn.onnx"), _cnn_inputs, [], bits=4)
    assert found["gptq"][1] == found["rtn"][1]
    assert found["gptq"][0] < 0.85 * found["rtn"][0], found
    assert "--calibration: 3 of 3 quantized tensors rounded by GPTQ" in found["gptq"][2].notes


@pytest.mark.parametrize("geometry", [
    dict(pads=[1, 0, 2, 1], strides=[2, 1]),
    dict(auto_pad="SAME_UPPER", strides=[2, 2]),
    dict(pads=[2, 1, 0, 1], dilations=[2, 3]),
    dict(auto_pad="SAME_LOWER", strides=[3, 2]),
    dict(auto_pad="VALID", group=3),
    dict(pads=[1, 1, 1, 1], group=6),            # depthwise
])
def test_im2col_rows_times_the_kernel_are_onnxruntimes_convolution(tmp_path: Path,
                                                                     geometry: dict) -> None:
    group = geometry.get("group", 1)
    rng = np.random.default_rng(3)
    w = rng.standard_normal((12, 6 // group, 3, 2)).astype(np.float32)
    x = rng.standard_normal((2, 6, 9, 8)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w"], ["y"], **geometry)
    path = _save(tmp_path / "conv.onnx", [node],
                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 6, 9, 8])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, list("nchw"))], {"w": w})
    y = ort_run(path, {"x": x}, exact=True)[0]                       # [2, 12, *out]
    rows = np.concatenate(list(conv_rows(x, ConvGeometry.of(node, w.shape))), axis=1)
    kernels = w.reshape(group, 12 // group, -1)                       # [G, M/G, K]
    mine = np.matmul(rows, kernels.transpose(0, 2, 1))               # [G, N * positions, M/G]
    expected = y.transpose(1, 0, 2, 3).reshape(group, 12 // group, -1).transpose(0, 2, 1)
    np.testing.assert_allclose(mine, expected, rtol=1e-4, atol=1e-4)


def test_conv_statistics_are_those_of_its_im2col_rows(tmp_path: Path) -> None:
    src = _cnn(tmp_path / "cnn.onnx")
    np.savez(tmp_path / "cal.npz", **_cnn_inputs(8, seed=1))
    store = open_model(src)
    store.calibrate(tmp_path / "cal.npz", {"depth"})
    stats = store.tensors["depth"].input_stats
    model = onnx.load(str(src))  # the depthwise Conv's input "b" as a second output
    model.graph.output.append(onnx.ValueInfoProto(name="b"))
    onnx.save(model, str(tmp_path / "b.onnx"))
    b = ort_run(tmp_path / "b.onnx", _cnn_inputs(8, seed=1), exact=True)[1]
    node = next(n for n in model.graph.node if n.op_type == "Conv" and n.input[1] == "depth")
    rows = np.concatenate(list(conv_rows(b, ConvGeometry.of(node, (16, 1, 3, 3)))), axis=1)
    assert stats.mean.shape == (16, 9) and stats.second_moments.shape == (16, 9, 9)
    assert stats.samples == rows.shape[1]
    np.testing.assert_allclose(stats.mean, rows.mean(axis=1), rtol=1e-5, atol=1e-6)
    expected = Sums(16, 9, True)
    expected.add(rows)
    np.testing.assert_allclose(stats.second_moments.load(), shrunk_moments(expected),
                               rtol=1e-4, atol=1e-5)
    raw = np.matmul(rows.transpose(0, 2, 1).astype(np.float64), rows) / rows.shape[1]
    np.testing.assert_allclose(np.diagonal(stats.second_moments.load(), axis1=1, axis2=2),
                               np.diagonal(raw, axis1=1, axis2=2), rtol=1e-5)


def _sums(rows: np.ndarray) -> Sums:
    sums = Sums(1, rows.shape[1], True)
    sums.add(rows.astype(np.float32)[None])
    return sums


def test_moments_from_few_rows_shrink_towards_their_diagonal() -> None:
    """Off-diagonal entries that are estimation noise are shrunk away (independent inputs,
    few rows), real correlation is kept (mixed inputs, many rows); the diagonal stays."""
    rng = np.random.default_rng(8)
    noise = _sums(rng.standard_normal((40, 64)))
    h = shrunk_moments(noise)[0]
    raw = noise.product[0] / 40
    off = ~np.eye(64, dtype=bool)
    np.testing.assert_allclose(np.diagonal(h), np.diagonal(raw))
    assert np.abs(h[off]).sum() < 0.1 * np.abs(raw[off]).sum()
    mixed = _sums(rng.standard_normal((4000, 8)) @ rng.standard_normal((8, 64)))
    h = shrunk_moments(mixed)[0]
    np.testing.assert_allclose(h, mixed.product[0] / 4000, rtol=0.05, atol=1e-3)


def test_too_few_calibration_rows_do_not_make_it_worse_than_plain_rounding(
        tmp_path: Path) -> None:
    """Independent inputs and 12 calibration rows for 64 inputs: what H says beyond its
    diagonal is noise; unshrunk, GPTQ fitted its codes to it."""
    src = _mlp(tmp_path / "mlp.onnx")

    def inputs(samples: int, seed: int) -> dict[str, np.ndarray]:
        return {"x": np.random.default_rng(seed).standard_normal((samples, K)).astype(
            np.float32)}

    np.savez(tmp_path / "cal.npz", **inputs(12, seed=1))
    errors = {}
    for method in ("mse", "gptq"):
        dst = tmp_path / f"{method}.onnx"
        compress(src, dst, Recipe([Quantize(bits=4, method=method, include=("w1",))]),
                 calibration=str(tmp_path / "cal.npz") if method == "gptq" else None)
        errors[method] = _output_error(src, dst, inputs(64, seed=2))
    assert errors["gptq"] < 1.02 * errors["mse"], errors


def _info(w: np.ndarray, h: np.ndarray) -> TensorInfo:
    stats = InputStats(np.zeros(w.shape[0]), np.ones(w.shape[0]), 100, SecondMoments.of(h))
    return TensorInfo("w", w.shape, np.dtype(np.float32), True, 1, 0, role="MatMul",
                      format="onnx", input_stats=stats)


LAYOUTS = [dict(bits=4), dict(bits=4, scheme="sym"), dict(bits=4, scale_bits=0),
           dict(bits=4, zero_bits=4), dict(bits=4, super_block=64), dict(bits=2),
           dict(bits=3, group_size=32), dict(bits=8), dict(bits=8, granularity="channel"),
           dict(bits=5, granularity="tensor"), dict(bits=2, super_block=128, group_size=32)]


@pytest.mark.parametrize("layout", LAYOUTS,
                         ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()))
def test_every_layout_keeps_its_grid_and_size_and_lowers_the_layer_error(layout: dict) -> None:
    """GPTQ keeps the layout and size of the method it falls back to without statistics:
    the same scales where they are floats or multipliers; where they are log-grid codes
    (`gridsearch`), codes on the same tables, which may point elsewhere."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((256, 48)).astype(np.float32)
    x = rng.standard_normal((2000, 64)) @ rng.standard_normal((64, 256)) + 1.0
    h = (x.T @ x / len(x)).astype(np.float32)
    plain = Quantize(**layout).apply(Dense(w), TensorInfo(
        "w", w.shape, np.dtype(np.float32), True, 1, 0, role="MatMul", format="onnx"))
    stage = Quantize(**layout)
    assert stage.plan(_info(w, h)).method == "gptq"
    rounded = stage.apply(Dense(w), _info(w, h))
    assert isinstance(rounded, Quantized) and rounded.nbytes == plain.nbytes
    assert rounded.describe() == plain.describe()
    assert type(rounded.scale_code) is type(plain.scale_code)
    if isinstance(plain.scale_code, ScaleCode):
        for table in ("high", "low"):
            np.testing.assert_array_equal(getattr(rounded.scale_code, table),
                                          getattr(plain.scale_code, table))
        np.testing.assert_array_equal(rounded.scale, rounded.scale_code.decode())
        assert rounded.scale_code.codes.shape == plain.scale_code.codes.shape
    else:
        np.testing.assert_array_equal(rounded.scale, plain.scale)
    if plain.zero_point is not None:
        assert rounded.zero_point.shape == plain.zero_point.shape
        assert rounded.zero_point.dtype == plain.zero_point.dtype
        if not isinstance(plain.scale_code, ScaleCode):
            np.testing.assert_array_equal(rounded.zero_point, plain.zero_point)
    assert rounded.super_block == plain.super_block
    lo, hi = -(1 << (plain.bits - 1)), (1 << (plain.bits - 1)) - 1
    assert rounded.codes.min() >= lo and rounded.codes.max() <= hi

    def layer_error(q: Quantized) -> float:
        d = (q.decode() - w).astype(np.float64)
        return float(np.einsum("kn,kl,ln->", d, h, d))

    assert layer_error(rounded) < 0.9 * layer_error(plain)


def test_unit_moments_leave_the_nearest_codes() -> None:
    """With H = I no error is worth moving: GPTQ's codes are the nearest ones on the
    fitted grid (a diagonal H couples no groups, so the grid is not searched either)."""
    w = np.random.default_rng(6).standard_normal((128, 32)).astype(np.float32)
    info = _info(w, np.eye(128, dtype=np.float32))
    for layout in (dict(scale_bits=0), dict()):
        fitted = Quantize(bits=4, method="rtn", **layout).apply(Dense(w), info)
        found = gptq_codes(fitted, w, np.eye(128, dtype=np.float32), info)
        np.testing.assert_array_equal(found.scale, fitted.scale)
        scale, zero = element_grid(found)
        nearest = np.clip(np.rint(w / scale) + zero, -8, 7)
        np.testing.assert_array_equal(found.codes, nearest)


def test_coordinate_descent_lowers_the_layer_error_gptq_leaves(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The sweeps after GPTQ move codes only where that lowers tr(D H D^T) (H damped):
    below GPTQ's own, on its grid, for correlated inputs, and with a mask kept."""
    rng = np.random.default_rng(8)
    w = rng.standard_normal((96, 24)).astype(np.float32)
    x = rng.standard_normal((3000, 32)) @ rng.standard_normal((32, 96)) + 0.5
    h = (x.T @ x / len(x)).astype(np.float32)
    info = _info(w, h)
    fitted = Quantize(bits=3, method="mse").apply(Dense(w), info)
    mask = rng.random(w.shape) > 0.3
    damped = h + optq.DAMPING * np.mean(np.diag(h)) * np.eye(len(h), dtype=np.float32)

    def layer_error(q: Quantized) -> float:
        d = (q.decode() - w).astype(np.float64)
        return float(np.einsum("kn,kl,ln->", d, damped, d))

    monkeypatch.setattr(gridsearch, "MAX_WORK", 0)  # the descent alone, on one grid
    found = {}
    for passes in (0, optq.PASSES):
        monkeypatch.setattr(optq, "PASSES", passes)
        found[passes] = (gptq_codes(fitted, w, h, info), gptq_codes(fitted, w, h, info, mask))
    for plain, swept in zip(found[0], found[optq.PASSES]):
        np.testing.assert_array_equal(swept.scale, plain.scale)
        assert layer_error(swept) < 0.97 * layer_error(plain)
    np.testing.assert_array_equal(found[optq.PASSES][1].decode()[~mask], 0)


def test_pruned_weights_stay_zero_and_their_error_is_fed_back(tmp_path: Path) -> None:
    """SparseGPT with the magnitude mask fixed: the error of the weights pruned is fed
    back to the kept ones, so pruned + GPTQ-quantized beats pruning alone."""
    found = _compare(tmp_path, _mlp(tmp_path / "mlp.onnx"), _mlp_inputs,
                     [Prune(sparsity=0.5)], bits=4)
    compress(tmp_path / "mlp.onnx", tmp_path / "pruned.onnx", Recipe([Prune(sparsity=0.5)]),
             Options(min_elements=16))
    pruned_only = _output_error(tmp_path / "mlp.onnx", tmp_path / "pruned.onnx",
                                _mlp_inputs(32, seed=2))
    assert found["gptq"][1] == found["rtn"][1]
    assert found["gptq"][0] < 0.95 * pruned_only < 0.95 * found["rtn"][0], (found, pruned_only)
    rng = np.random.default_rng(7)
    w = rng.standard_normal((128, 16)).astype(np.float32)
    x = rng.standard_normal((500, 32)) @ rng.standard_normal((32, 128))
    info = _info(w, (x.T @ x / 500).astype(np.float32))
    pruned = Prune(sparsity=0.5).apply(Dense(w), info)
    out = Quantize(bits=4).apply(pruned, info)
    assert isinstance(out, Sparse) and np.array_equal(out.mask, pruned.mask)
    assert np.all(out.values.decode()[~out.mask] == 0) and np.all(out.decode()[~out.mask] == 0)


def test_low_rank_factors_each_get_their_own_inputs_moments(tmp_path: Path) -> None:
    """lowrank then quantize: the factor the inputs multiply gets H, the other one the
    moments of its own inputs (MatMul [K, N]: L R; Gemm transB [N, K]: R first)."""
    found = _compare(tmp_path, _mlp(tmp_path / "mlp.onnx", rank=4), _mlp_inputs,
                     [Factorize(rank=4)], bits=3)
    assert found["gptq"][1] == found["rtn"][1]
    assert found["gptq"][0] < 0.85 * found["rtn"][0], found
    assert "--calibration: 2 of 2 quantized tensors rounded by GPTQ" in found["gptq"][2].notes


def test_gptq_is_refused_without_calibration_safetensors_or_in_batch(samples: Path,  # noqa: F811
                                                                     tmp_path: Path) -> None:
    cases = [([samples / "mlp.onnx"], "needs --calibration FILE.npz"),
             ([samples / "mlp.safetensors"], "needs an ONNX model"),
             ([samples / "mlp.onnx", samples / "cnn.onnx"], "batch mode does not run models")]
    for models, message in cases:
        out = tmp_path / "out"
        result = run_cli(["compress", *models, "-o", out, "quantize", "--method", "gptq"])
        assert result.exit_code == 2, result.output
        assert message in result.output and len(result.output.strip().splitlines()) == 1
        assert not out.exists()
    with pytest.raises(RecipeError, match="needs --calibration"):
        compress(samples / "mlp.onnx", tmp_path / "o.onnx", Recipe([Quantize(method="gptq")]))


def test_same_inputs_give_the_same_bytes(tmp_path: Path) -> None:
    """Whatever the pipeline's or BLAS's thread count (the moments and the factorization
    run on one BLAS thread: threaded sums round differently)."""
    src = _cnn(tmp_path / "cnn.onnx")
    np.savez(tmp_path / "cal.npz", **_cnn_inputs(16, seed=1))
    digests = set()
    for i, (threads, blas) in enumerate(((1, 1), (2, 2), (2, 1))):
        dst = tmp_path / f"{i}.onnx"
        with threadpool_limits(blas, user_api="blas"):
            compress(src, dst, Recipe([Quantize(bits=4, method="gptq")]),
                     Options(min_elements=16, threads=threads),
                     calibration=str(tmp_path / "cal.npz"))
        digests.add(dst.read_bytes())
    assert len(digests) == 1


def test_layers_over_the_limits(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Over the pass budget the moments are collected in several passes (same bytes);
    over the per-layer limit a weight falls back to plain rounding, named in a note."""
    src = _mlp(tmp_path / "mlp.onnx")
    np.savez(tmp_path / "cal.npz", **_mlp_inputs(64, seed=1))
    recipe, options = Recipe([Quantize(bits=4, method="gptq")]), Options(min_elements=16)
    cal = str(tmp_path / "cal.npz")
    compress(src, tmp_path / "one.onnx", recipe, options, calibration=cal)
    monkeypatch.setattr(calibrate, "PASS_ELEMENTS", K * K)
    report = compress(src, tmp_path / "two.onnx", recipe, options, calibration=cal)
    assert any("(at least 64 input rows each; 2 passes over the data)" in n
               for n in report.notes), report.notes
    assert (tmp_path / "one.onnx").read_bytes() == (tmp_path / "two.onnx").read_bytes()
    monkeypatch.setattr(calibrate, "MAX_ELEMENTS", K * K)
    report = compress(src, tmp_path / "big.onnx", recipe, options, calibration=cal)
    assert any("'w2' takes 128 inputs per output; its 16,384-element input moments exceed the "
               "limit of 4,096, so gptq does not round it" in n for n in report.notes)
    assert ("--calibration: 1 of 2 quantized tensors rounded by GPTQ; 1 by mse instead, e.g. "
            "'w2' (its input moments are over the size limit)") in report.notes


@pytest.mark.parametrize("bits", [4, 8])
def test_the_grid_search_lowers_the_layer_error_at_the_same_bytes(
        bits: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each group's scale code and zero point chosen by the error after GPTQ: lower than
    GPTQ on the data-free fit, on the same tables and bytes; over MAX_WORK, the fit as is."""
    rng = np.random.default_rng(11)
    w = rng.standard_normal((64, 40)).astype(np.float32)
    x = rng.standard_normal((3000, 16)) @ rng.standard_normal((16, 64)) + 0.5
    h = (x.T @ x / len(x)).astype(np.float32)
    info = _info(w, h)
    fitted = Quantize(bits=bits, method="mse" if bits < 8 else "rtn").apply(Dense(w), info)
    searched = gptq_codes(fitted, w, h, info)
    monkeypatch.setattr(gridsearch, "MAX_WORK", 0)
    plain = gptq_codes(fitted, w, h, info)
    np.testing.assert_array_equal(plain.scale, fitted.scale)

    def layer_error(q: Quantized) -> float:
        d = (q.decode() - w).astype(np.float64)
        return float(np.einsum("kn,kl,ln->", d, h, d))

    assert searched.nbytes == plain.nbytes and searched.describe() == plain.describe()
    assert layer_error(searched) < 0.8 * layer_error(plain), (layer_error(searched),
                                                               layer_error(plain))


@pytest.mark.parametrize("bits", [4, 8])
def test_one_hot_inputs_keep_the_data_free_grid(bits: int) -> None:
    """A diagonal H (one-hot inputs) couples no groups: GPTQ is rounding to nearest there,
    and the grid is not fitted to the calibration samples' frequencies (that overfitted
    magika's byte table), ragged last group included; same bytes."""
    rng = np.random.default_rng(12)
    w = rng.standard_normal((40, 24)).astype(np.float32)
    h = np.diag(rng.gamma(0.5, size=40)).astype(np.float32)
    info = _info(w, h)
    fitted = Quantize(bits=bits, method="mse" if bits < 8 else "rtn").apply(Dense(w), info)
    assert fitted.group_size == 16 and fitted.scale.shape == (3, 24)
    searched = gptq_codes(fitted, w, h, info)
    assert searched.nbytes == fitted.nbytes and searched.describe() == fitted.describe()
    np.testing.assert_array_equal(searched.scale, fitted.scale)


def test_grid_moves_alternate_with_descent_under_output_moments(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Under H (x) G the rows are coupled and the grid is not searched; instead each group's
    grid moves with the codes kept where tr(G D H D^T) falls, then the codes descend again:
    lower than without the moves, on the same tables and bytes."""
    rng = np.random.default_rng(13)
    w = rng.standard_normal((48, 32)).astype(np.float32)
    x = rng.standard_normal((2000, 16)) @ rng.standard_normal((16, 48)) + 0.5
    h = (x.T @ x / len(x)).astype(np.float32)
    j = rng.standard_normal((200, 32)) @ np.diag(np.linspace(0.2, 2, 32))
    g = j.T @ j / len(j)
    info = _info(w, h)
    fitted = Quantize(bits=4, method="mse").apply(Dense(w), info)
    alternated = gptq_codes(fitted, w, h, info, outputs=g)
    monkeypatch.setattr(gptq, "ROUNDS", 0)
    plain = gptq_codes(fitted, w, h, info, outputs=g)
    np.testing.assert_array_equal(plain.scale, fitted.scale)

    def layer_error(q: Quantized) -> float:
        d = (q.decode() - w).astype(np.float64)
        return float(np.trace(g @ d.T @ h @ d))

    assert alternated.nbytes == plain.nbytes and alternated.describe() == plain.describe()
    assert layer_error(alternated) < 0.97 * layer_error(plain), (layer_error(alternated),
                                                                 layer_error(plain))
