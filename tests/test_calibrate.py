"""--calibration: the original model run on calibration inputs, end to end.

The statistics it collects and the GPTQ rounding they drive are tested in
test_gptq.py; here: a classifier head after ReLU and pooling, where the
output error measured on other inputs than the calibration ones must drop;
errors, external data and fixed batch sizes.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from modelpress import Quantize, Recipe, compress

from conftest import ort_run, run_cli, samples  # noqa: F401 (fixture)

K, N, POSITIONS = 1024, 8, 16


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
            assert "--calibration: 1 of 1 quantized tensors rounded by GPTQ" in report.notes
            assert any("input statistics for 1 MatMul/Gemm/Conv weights (at least 32 input "
                       "rows" in n for n in report.notes), report.notes
    assert sizes[True] == sizes[False]
    assert errors[True] < 0.5 * errors[False], errors


def test_calibration_rounds_the_transformers_layers_by_gptq(samples: Path,  # noqa: F811
                                                            tmp_path: Path) -> None:
    """The sample transformer: its seven MatMul/Gemm weights and its two Gather tables
    (embeddings, under the probed metric of a row's error) get GPTQ; every layer but
    the head (whose output is the model's) is probed; the file is as large as without."""
    ids = np.load(samples / "transformer_test_inputs.npz")["input_ids"][:4]
    np.savez(tmp_path / "cal.npz", input_ids=ids)
    plain, calibrated = tmp_path / "a.onnx", tmp_path / "b.onnx"
    compress(samples / "transformer.onnx", plain, Recipe([Quantize(bits=4)]))
    report = compress(samples / "transformer.onnx", calibrated, Recipe([Quantize(bits=4)]),
                      calibration=str(tmp_path / "cal.npz"))
    assert "--calibration: 9 of 9 quantized tensors rounded by GPTQ" in report.notes
    assert ("--calibration: output-side moments probed for 8 tensors (704 directions, 2 runs "
            "each)" in report.notes), report.notes
    assert plain.stat().st_size == calibrated.stat().st_size
    assert plain.read_bytes() != calibrated.read_bytes()
    methods = {row.name: row.stages[0]["method"] for row in report.rows}
    assert methods["embed_tokens.weight"] == "gptq" and methods["lm_head.weight"] == "gptq"


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
        assert "--calibration: 1 of 1 quantized tensors rounded by GPTQ" in report.notes
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
