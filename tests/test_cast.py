"""cast: fp16/bf16/fp8 values and scales, their ONNX and safetensors forms."""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest

from modelpress import (Cast, Dense, Prune, Recipe, Scaled, Sparse, TensorInfo, compare, compress, decompress)
from modelpress.core.errors import UnsupportedTensorError
from modelpress.formats import open_model
from modelpress.formats.safetensors.header import read_header

from conftest import matmul_model, ort_run, rng_weights, write_safetensors

INFO = TensorInfo("w", (48, 200), np.dtype(np.float32), True, 0, 1)


@pytest.mark.parametrize("dtype, np_dtype", [("fp16", np.float16), ("bf16", ml_dtypes.bfloat16)])
def test_half_precision_is_a_plain_cast(dtype: str, np_dtype) -> None:
    w = rng_weights(48, 200)
    out = Cast(dtype=dtype).apply(Dense(w), INFO)
    assert isinstance(out, Scaled) and out.scale is None
    np.testing.assert_array_equal(out.values.view(np.uint16), w.astype(np_dtype).view(np.uint16))
    assert out.nbytes == w.size * 2 and out.describe() == dtype


@pytest.mark.parametrize("dtype, top", [("fp8-e4m3", 448.0), ("fp8-e5m2", 57344.0)])
def test_fp8_channel_scale_uses_the_full_range(dtype: str, top: float) -> None:
    w = rng_weights(48, 200) * np.linspace(0.01, 10, 48, dtype=np.float32)[:, None]
    out = Cast(dtype=dtype, scale="channel").apply(Dense(w), INFO)
    assert out.scale.shape == (48, 1) and out.scale.dtype == np.float32
    peaks = np.abs(out.values.astype(np.float32)).max(axis=1)
    np.testing.assert_array_equal(peaks, np.full(48, top, np.float32))
    # Relative error per element is bounded by half an ulp of the format (plus subnormals).
    mantissa = 3 if dtype == "fp8-e4m3" else 2
    assert compare(w, out.decode()).rel_l2 < 2.0 ** -(mantissa + 1)
    assert out.nbytes == w.size + 48 * 4 and out.describe() == f"{dtype} ch"
    per_tensor = Cast(dtype=dtype, scale="tensor").apply(Dense(w), INFO)
    assert per_tensor.scale.shape == (1, 1) and per_tensor.describe() == f"{dtype} tensor"
    assert float(np.abs(per_tensor.values.astype(np.float32)).max()) == top


def test_out_of_range_half_cast_is_refused_with_the_fix() -> None:
    w = rng_weights(4, 8) * 1e5
    with pytest.raises(UnsupportedTensorError, match="beyond fp16's largest value .* use --scale"):
        Cast(dtype="fp16").apply(Dense(w), TensorInfo("big", w.shape, w.dtype, True, 0, 1))
    scaled = Cast(dtype="fp16", scale="tensor").apply(Dense(w), INFO)
    assert np.isfinite(scaled.decode()).all()
    assert compare(w, scaled.decode()).rel_l2 < 1e-3


def test_cast_keeps_pruned_zeros_exact() -> None:
    w = rng_weights(48, 200)
    out = Cast(dtype="fp8-e4m3").apply(Prune(sparsity=0.6).apply(Dense(w), INFO), INFO)
    assert isinstance(out, Sparse) and isinstance(out.values, Scaled)
    assert int((out.decode() == 0).sum()) == round(0.6 * w.size)
    assert out.describe() == "60% sparse + fp8-e4m3 ch"


def test_casting_to_the_models_own_dtype_is_skipped_with_a_note(tmp_path: Path) -> None:
    src = write_safetensors(tmp_path / "h.safetensors",
                            {"l.weight": rng_weights(64, 128).astype(np.float16)})
    report = compress(src, tmp_path / "o.safetensors", Recipe([Cast(dtype="fp16")]))
    assert report.rows == []
    assert report.notes == ["l.weight: cast left it as is (it is already fp16)"]


def optimized_ops(path: Path, tmp_path: Path) -> list[str]:
    """Op types left after onnxruntime's load-time optimizations (constant folding)."""
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]


@pytest.mark.parametrize("dtype, stored, scaled, opset", [
    ("fp16", onnx.TensorProto.FLOAT16, False, 17),
    ("bf16", onnx.TensorProto.BFLOAT16, False, 17),
    ("fp8-e4m3", onnx.TensorProto.FLOAT8E4M3FN, True, 19),
    ("fp8-e5m2", onnx.TensorProto.FLOAT8E5M2, True, 19),
])
def test_onnx_forms_run_and_match_the_table(tmp_path: Path, dtype: str, stored: int,
                                            scaled: bool, opset: int) -> None:
    w1, w2 = rng_weights(64, 96, seed=1), rng_weights(96, 80, seed=2)
    src = matmul_model(tmp_path / "m.onnx", {"w1": w1, "w2": w2})
    report = compress(src, tmp_path / "o.onnx", Recipe([Cast(dtype=dtype)]))
    model = onnx.load(str(tmp_path / "o.onnx"))
    onnx.checker.check_model(model, full_check=True)
    assert [o.version for o in model.opset_import if o.domain == ""] == [opset]
    producers = {n.output[0]: n for n in model.graph.node}
    inits = {t.name: t for t in model.graph.initializer}
    # fp16/bf16: values -> Cast -> W; fp8: values -> Cast -> Mul(scale) -> W.
    last = producers["w1"]
    assert last.op_type == ("Mul" if scaled else "Cast")
    cast = producers[last.input[0]] if scaled else last
    assert cast.op_type == "Cast"
    values = inits[cast.input[0]]
    assert values.data_type == stored and list(values.dims) == [64, 96]
    assert {producers[w].op_type for w in ("w1", "w2")} == {last.op_type}
    if scaled:  # one scale per output column of the MatMul weight [K, N]
        assert list(inits[last.input[1]].dims) == [1, 96]
    row = next(r for r in report.rows if r.name == "w1")
    assert row.bytes_after == 64 * 96 * (1 if scaled else 2) + (96 * 4 if scaled else 0)
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(np.float32)
    out = ort_run(tmp_path / "o.onnx", {"x": x})[0]
    decoded = [open_model(tmp_path / "o.onnx").decode(n).decode() for n in ("w1", "w2")]
    np.testing.assert_allclose(out, x @ decoded[0] @ decoded[1], rtol=1e-4, atol=1e-4)
    assert compare(w1, decoded[0]).rel_l2 == pytest.approx(row.error.rel_l2, rel=1e-6)
    # onnxruntime folds the chain at load: no cost at run time
    assert optimized_ops(tmp_path / "o.onnx", tmp_path) == ["MatMul", "MatMul"]


def load_header_tensors(path: Path) -> tuple[dict[str, tuple[str, tuple]], dict]:
    header = read_header(path)
    entries = {n: (e.dtype, e.shape) for n, e in header.entries.items()}
    return entries, json.loads(header.metadata["modelpress"])["tensors"]


@pytest.mark.parametrize("model_dtype", [np.float32, ml_dtypes.bfloat16])
def test_safetensors_fp8_is_compressed_tensors_float_quantized(tmp_path: Path,
                                                              model_dtype) -> None:
    w = rng_weights(48, 200).astype(model_dtype)
    src = write_safetensors(tmp_path / "in.safetensors", {"fc.weight": w,
                                                          "fc.bias": rng_weights(48)})
    report = compress(src, tmp_path / "o.safetensors", Recipe([Cast(dtype="fp8-e4m3")]))
    entries, specs = load_header_tensors(tmp_path / "o.safetensors")
    scale_code = "F32" if model_dtype == np.float32 else "BF16"
    assert entries == {"fc.weight": ("F8_E4M3", (48, 200)), "fc.weight_scale": (scale_code, (48, 1)),
                       "fc.bias": ("F32", (48,))}
    assert specs["fc.weight"]["layout"] == "float-quantized"
    store = open_model(tmp_path / "o.safetensors")
    values, scale = store.read("fc.weight"), store.read("fc.weight_scale")
    independent = values.astype(np.float32) * scale.astype(np.float32)
    row = report.rows[0]
    assert compare(w.astype(np.float32), independent).rel_l2 == pytest.approx(row.error.rel_l2,
                                                                              rel=1e-6)
    assert row.bytes_after == 48 * 200 + scale.nbytes
    decompress(tmp_path / "o.safetensors", tmp_path / "d.safetensors")
    dense = open_model(tmp_path / "d.safetensors").read("fc.weight")
    assert dense.dtype == np.dtype(model_dtype)
    np.testing.assert_array_equal(dense.astype(np.float32),
                                  independent.astype(model_dtype).astype(np.float32))


@pytest.mark.parametrize("stage, layout, stored", [
    (Cast(dtype="fp16"), "scaled", {"fc.weight": ("F16", (48, 200))}),
    (Cast(dtype="bf16"), "scaled", {"fc.weight": ("BF16", (48, 200))}),
    (Cast(dtype="fp8-e5m2", scale="tensor"), "scaled",
     {"fc.weight": ("F8_E5M2", (48, 200)), "fc.weight_scale": ("F32", (1,))}),
    (Cast(dtype="fp8-e4m3", scale="tensor"), "float-quantized",
     {"fc.weight": ("F8_E4M3", (48, 200)), "fc.weight_scale": ("F32", (1,))}),
])
def test_safetensors_native_dtypes_under_the_original_name(tmp_path: Path, stage, layout,
                                                           stored) -> None:
    src = write_safetensors(tmp_path / "in.safetensors", {"fc.weight": rng_weights(48, 200)})
    compress(src, tmp_path / "o.safetensors", Recipe([stage]))
    entries, specs = load_header_tensors(tmp_path / "o.safetensors")
    assert entries == stored and specs["fc.weight"]["layout"] == layout
    if stage.dtype in ("fp16", "bf16"):
        from safetensors import safe_open
        with safe_open(str(tmp_path / "o.safetensors"), framework="np") as fh:
            assert fh.get_tensor("fc.weight").shape == (48, 200)  # loads with safetensors itself


@pytest.mark.parametrize("model_dtype", [np.float16, ml_dtypes.bfloat16])
@pytest.mark.parametrize("recipe", ["cast", "fp8", "cluster", "lowrank", "lowrank+cluster"])
def test_half_precision_onnx_models_keep_their_type(tmp_path: Path, model_dtype,
                                                    recipe: str) -> None:
    from onnx import TensorProto, helper, numpy_helper
    from modelpress import Cluster, Factorize
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(model_dtype))
    w = rng_weights(64, 96).astype(model_dtype)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", elem, [2, 64])],
        [helper.make_tensor_value_info("y", elem, [2, 96])], [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "m.onnx"))
    stages = {"cast": [Cast(dtype="bf16" if model_dtype == np.float16 else "fp16")],
              "fp8": [Cast(dtype="fp8-e4m3")], "cluster": [Cluster(bits=4)],
              "lowrank": [Factorize(rank=8)],
              "lowrank+cluster": [Factorize(rank=8), Cluster(bits=4)]}[recipe]
    report = compress(tmp_path / "m.onnx", tmp_path / "o.onnx", Recipe(stages))
    assert report.rows
    onnx.checker.check_model(str(tmp_path / "o.onnx"), full_check=True)
    x = rng_weights(2, 64, seed=3).astype(model_dtype)
    if model_dtype == np.float16:  # onnxruntime's CPU MatMul has no bf16 kernel
        out = ort_run(tmp_path / "o.onnx", {"x": x})[0]
        assert out.dtype == np.float16 and np.isfinite(out.astype(np.float32)).all()
