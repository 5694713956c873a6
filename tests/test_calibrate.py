"""--calibration: rounding MatMul/Gemm weights with their inputs' statistics.

The re-rounding (compress_core/calibrate.py) is checked on its own terms
(mean effect cancelled, objective never worse, codes one step away and in
range, scales untouched); which graph values count as non-negative
(formats/onnx_calibrate.py); and end to end on a classifier head after ReLU
and pooling, where the output error measured on other inputs than the
calibration ones must drop.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from modelpress import Quantize, Recipe, compress
from modelpress.core.calibrate import InputStats, compensate
from modelpress.core.encoded import Dense, Quantized
from modelpress.core.tensorinfo import TensorInfo
from modelpress.formats.onnx.calibrate import nonnegative

from conftest import ort_run, run_cli, samples  # noqa: F401 (fixture)

K, N, POSITIONS = 1024, 8, 16


def _stats(x: np.ndarray) -> InputStats:
    rows = x.reshape(-1, x.shape[-1]).astype(np.float64)
    return InputStats(rows.mean(0), rows.var(0), rows.shape[0])


def _objective(q, w: np.ndarray, stats: InputStats) -> np.ndarray:
    """Per output channel: (mu . D)^2 + sum var D^2 (the model compensate minimises)."""
    d = q.decode().astype(np.float64) - w
    return (stats.mean @ d) ** 2 + stats.var @ (d * d)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_compensate_cancels_the_mean_and_never_raises_the_objective(bits: int) -> None:
    rng = np.random.default_rng(bits)
    w = rng.standard_normal((K, N)).astype(np.float32)
    x = np.maximum(rng.normal(0.3, 1.0, (64, POSITIONS, K)), 0).mean(axis=1)
    stats = _stats(x)
    info = TensorInfo("w", w.shape, np.dtype(np.float32), True, 1, 0, format="onnx")
    q = Quantize(bits=bits).apply(Dense(w), info)
    c = compensate(q, w, stats, input_axis=0)
    assert c is not q
    assert np.array_equal(c.scale, q.scale) and c.scale_code is q.scale_code
    step = c.codes.astype(np.int16) - q.codes
    assert set(np.unique(step)) <= {-1, 0, 1} and np.count_nonzero(step) > 0
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    assert c.codes.min() >= lo and c.codes.max() <= hi
    before, after = _objective(q, w, stats), _objective(c, w, stats)
    assert np.all(after <= before * (1 + 1e-9))
    assert after.sum() < 0.5 * before.sum()
    mean_before = np.abs(stats.mean @ (q.decode() - w))
    mean_after = np.abs(stats.mean @ (c.decode() - w))
    assert mean_after.sum() < 0.2 * mean_before.sum()


def test_compensate_works_along_either_axis() -> None:
    """A torch-style [N, K] weight (Gemm transB=1) gets the same codes, transposed."""
    rng = np.random.default_rng(7)
    w = rng.standard_normal((K, N)).astype(np.float32)
    stats = _stats(np.maximum(rng.normal(0.3, 1.0, (64, POSITIONS, K)), 0).mean(axis=1))
    kn = TensorInfo("w", w.shape, np.dtype(np.float32), True, 1, 0, format="onnx")
    nk = TensorInfo("w", w.T.shape, np.dtype(np.float32), True, 0, 1, format="onnx")
    a = compensate(Quantize(bits=4).apply(Dense(w), kn), w, stats, 0)
    b = compensate(Quantize(bits=4).apply(Dense(np.ascontiguousarray(w.T)), nk),
                   np.ascontiguousarray(w.T), stats, 1)
    np.testing.assert_array_equal(a.codes, b.codes.T)


def test_compensate_leaves_codes_when_inputs_vary_around_a_zero_mean() -> None:
    rng = np.random.default_rng(3)
    w = rng.standard_normal((K, N)).astype(np.float32)
    stats = InputStats(np.zeros(K), np.ones(K), 100)
    info = TensorInfo("w", w.shape, np.dtype(np.float32), True, 1, 0, format="onnx")
    q = Quantize(bits=4).apply(Dense(w), info)
    assert compensate(q, w, stats, 0) is q


def test_eight_bit_codes_at_the_top_of_the_range_do_not_wrap() -> None:
    """Every weight lies above the grid's top code (127): moving up would give 128, which
    int8 arithmetic wraps to -128. The mean then cannot be cancelled; nothing changes."""
    codes = np.full((K, N), 127, np.int8)
    q = Quantized(codes, np.ones((1, N), np.float32), None, 8, "channel", 1, 0)
    w = np.full((K, N), 127.4, np.float32)
    stats = InputStats(np.full(K, 1.0), np.full(K, 1e-6), 100)
    assert compensate(q, w, stats, 0) is q
    q2 = q.with_codes(np.where(np.arange(K)[:, None] % 2 == 0, 126, 127).astype(np.int8))
    c = compensate(q2, w, stats, 0)           # the 126 codes can move up, and do
    assert c.codes.min() >= 126 and np.count_nonzero(c.codes.astype(int) - q2.codes) > 0


def _value_model(nodes: list[onnx.NodeProto],
                 inits: list[onnx.TensorProto] = ()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [2, 4])], [helper.make_tensor_value_info(
            nodes[-1].output[0], TensorProto.FLOAT, None)], list(inits))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("nodes, expected", [
    ([helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Flatten", ["a"], ["v"])], True),
    ([helper.make_node("Relu", ["x"], ["a"]), helper.make_node("GlobalAveragePool", ["a"], ["b"]),
      helper.make_node("Squeeze", ["b"], ["v"])], True),
    ([helper.make_node("Equal", ["x", "x"], ["a"]),
      helper.make_node("Cast", ["a"], ["v"], to=TensorProto.FLOAT)], True),
    ([helper.make_node("Clip", ["x", "zero"], ["v"])], True),
    ([helper.make_node("Clip", ["x", "minus"], ["v"])], False),
    ([helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Neg", ["a"], ["v"])], False),
    ([helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Concat", ["a", "x"], ["v"],
                                                              axis=0)], False),
    ([helper.make_node("Identity", ["x"], ["v"])], False),
])
def test_which_values_are_non_negative(nodes: list[onnx.NodeProto], expected: bool) -> None:
    inits = [numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
             numpy_helper.from_array(np.array(-1.0, np.float32), "minus")]
    assert nonnegative(_value_model(nodes, inits), "v") is expected


def _head_model(path: Path, w: np.ndarray) -> Path:
    """x [batch, positions, K] -> Relu -> mean over positions -> MatMul W [K, N]."""
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("ReduceMean", ["r"], ["p"], axes=[1], keepdims=0),
             helper.make_node("MatMul", ["p", "w"], ["y"])]
    graph = helper.make_graph(
        nodes, "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                      ["batch", POSITIONS, K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", N])],
        [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _features(samples: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0.3, 1.0, (samples, POSITIONS, K)).astype(
        np.float32)


def test_calibration_lowers_the_output_error_of_a_pooled_head(tmp_path: Path) -> None:
    w = np.random.default_rng(0).standard_normal((K, N)).astype(np.float32)
    src = _head_model(tmp_path / "head.onnx", w)
    np.savez(tmp_path / "cal.npz", x=_features(32, seed=1))
    x = _features(64, seed=2)  # evaluation inputs: other samples
    reference = ort_run(src, {"x": x}, exact=True)[0]
    errors, sizes = {}, {}
    for calibration in (None, tmp_path / "cal.npz"):
        dst = tmp_path / f"out-{calibration is not None}.onnx"
        report = compress(src, dst, Recipe([Quantize(bits=4)]),
                          calibration=None if calibration is None else str(calibration))
        y = ort_run(dst, {"x": x}, exact=True)[0]
        errors[calibration is not None] = np.linalg.norm(y - reference) / np.linalg.norm(reference)
        sizes[calibration is not None] = dst.stat().st_size
        if calibration is not None:
            assert any("rounding changed in 1 tensors" in n for n in report.notes), report.notes
            assert any("input statistics for 1 MatMul/Gemm weights (at least 32 input rows"
                       in n for n in report.notes), report.notes
    assert sizes[True] == sizes[False]
    assert errors[True] < 0.5 * errors[False], errors


def test_calibration_is_not_used_where_inputs_can_be_negative(samples: Path,  # noqa: F811
                                                              tmp_path: Path) -> None:
    """The sample transformer's MatMuls follow LayerNorm, GELU or attention: the model is
    not run and the output is the same as without --calibration."""
    ids = np.load(samples / "transformer_test_inputs.npz")["input_ids"][:4]
    np.savez(tmp_path / "cal.npz", input_ids=ids)
    plain, calibrated = tmp_path / "a.onnx", tmp_path / "b.onnx"
    compress(samples / "transformer.onnx", plain, Recipe([Quantize(bits=4)]))
    report = compress(samples / "transformer.onnx", calibrated, Recipe([Quantize(bits=4)]),
                      calibration=str(tmp_path / "cal.npz"))
    assert any("not used (no quantized MatMul/Gemm weight takes non-negative inputs)" in n
               for n in report.notes), report.notes
    assert plain.read_bytes() == calibrated.read_bytes()


def test_calibration_errors_are_one_line(samples: Path, tmp_path: Path) -> None:  # noqa: F811
    w = np.random.default_rng(0).standard_normal((K, N)).astype(np.float32)
    src = _head_model(tmp_path / "head.onnx", w)
    np.savez(tmp_path / "wrong.npz", y=_features(2, seed=1))
    cases = [
        (["--calibration", tmp_path / "missing.npz"], "missing.npz: no such file"),
        (["--calibration", tmp_path / "wrong.npz"], "no array for model input 'x'"),
    ]
    for extra, message in cases:
        out = tmp_path / "o.onnx"
        result = run_cli(["compress", src, "-o", out, "--no-eval", *extra, "quantize"])
        assert result.exit_code == 1, result.output
        assert message in result.output and "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1, result.output
        assert not out.exists()
    np.savez(tmp_path / "cal.npz", x=_features(2, seed=1))
    result = run_cli(["compress", samples / "mlp.safetensors", "-o", tmp_path / "o.safetensors",
                      "--calibration", tmp_path / "cal.npz", "quantize"])
    assert result.exit_code == 1 and "needs an ONNX model" in result.output
    assert not (tmp_path / "o.safetensors").exists()
    result = run_cli(["compress", samples / "mlp.onnx", samples / "cnn.onnx", "-o",
                      tmp_path / "batch", "--calibration", tmp_path / "cal.npz", "quantize"])
    assert result.exit_code == 2 and "--calibration applies to one model at a time" in result.output


def test_calibration_reads_external_data_in_place(tmp_path: Path) -> None:
    """A model whose weights live in a data file beside it: onnxruntime reads them from the
    model's folder (the graph it runs is held in memory)."""
    w = np.random.default_rng(0).standard_normal((K, N)).astype(np.float32)
    inline = _head_model(tmp_path / "inline.onnx", w)
    folder = tmp_path / "ext"
    folder.mkdir()
    src = folder / "head.onnx"
    onnx.save(onnx.load(str(inline)), str(src), save_as_external_data=True,
              all_tensors_to_one_file=True, location="head.data", size_threshold=0)
    np.savez(tmp_path / "cal.npz", x=_features(8, seed=1))
    outputs = {}
    for name, path in (("inline", inline), ("external", src)):
        dst = tmp_path / f"{name}-out.onnx"
        report = compress(path, dst, Recipe([Quantize(bits=4)]),
                          calibration=str(tmp_path / "cal.npz"))
        assert any("rounding changed in 1 tensors" in n for n in report.notes), report.notes
        outputs[name] = ort_run(dst, {"x": _features(4, seed=2)}, exact=True)[0]
    np.testing.assert_array_equal(outputs["inline"], outputs["external"])


def test_calibration_follows_a_fixed_batch_dimension(tmp_path: Path) -> None:
    """A model whose input has batch 2: the samples run two at a time; a count that is not
    a multiple of 2 is refused in one line."""
    w = np.random.default_rng(0).standard_normal((K, N)).astype(np.float32)
    model = onnx.load(str(_head_model(tmp_path / "dyn.onnx", w)))
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 2
    src = tmp_path / "fixed.onnx"
    onnx.save(model, str(src))
    np.savez(tmp_path / "cal.npz", x=_features(6, seed=1))
    report = compress(src, tmp_path / "o.onnx", Recipe([Quantize(bits=4)]),
                      calibration=str(tmp_path / "cal.npz"))
    assert any("at least 6 input rows" in n for n in report.notes), report.notes
    np.savez(tmp_path / "odd.npz", x=_features(5, seed=1))
    result = run_cli(["compress", src, "-o", tmp_path / "p.onnx", "--no-eval", "--calibration",
                      tmp_path / "odd.npz", "quantize"])
    assert result.exit_code == 1 and "batches of exactly 2 samples" in result.output
    assert len(result.output.strip().splitlines()) == 1 and not (tmp_path / "p.onnx").exists()
