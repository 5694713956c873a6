"""Coded-scale quantization with its error measured in the kernel: same encoding, same sums."""

from __future__ import annotations

import math
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import modelpress.core.pipeline as pipeline
import modelpress.core.quantize.coded as coded
from modelpress import Quantize, Recipe
from modelpress.app.api import compress
from modelpress.core.metrics import compare
from modelpress.core.pipeline import Options
from modelpress.core.quantize.coded import quantize_coded, quantize_coded_measured
from modelpress.core.scalecode import LogGrid
from modelpress.core.tensorinfo import TensorInfo
from conftest import matmul_model, sha256, write_safetensors

BF16 = np.dtype(ml_dtypes.bfloat16)


def _weights(shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Heavy-tailed weights with column scales, an all-zero stretch, a constant one and -0.0."""
    rng = np.random.default_rng(seed)
    w = rng.standard_t(5, shape).astype(np.float32) * 0.02
    w *= np.exp(rng.normal(0, 1, shape[-1])).astype(np.float32)
    flat = w.reshape(-1)
    flat[: flat.size // 5] = 0.0            # all-zero groups (and a zero tensor start)
    flat[flat.size // 5: flat.size // 4] = 0.125
    flat[-7:] = -0.0
    return w


def _close(a: float, b: float) -> bool:
    return a == b or math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-12)


# (shape, granularity, channel axis, block axis, group size): the stacked layout
# ([in, out], groups along axis 0), the row layout, a ragged last group (padding),
# conv weights, per-channel and per-tensor scales.
LAYOUTS = [((96, 40), "group", 1, 0, 16), ((40, 96), "group", 0, 1, 16),
           ((24, 50), "group", 0, 1, 16), ((8, 6, 3, 3), "group", 0, 1, 2),
           ((64, 48), "group", 1, 0, 32), ((30, 20), "channel", 0, 1, None),
           ((30, 20), "tensor", 0, 1, None)]


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("bits,symmetric,method", [(4, False, "mse"), (4, False, "rtn"),
                                                   (4, True, "mse"), (2, False, "mse"),
                                                   (8, True, "rtn")])
def test_same_encoding_and_the_sums_of_compare(layout, bits, symmetric, method,
                                               monkeypatch) -> None:
    monkeypatch.setattr(coded, "_CHUNK_ELEMENTS", 300)  # many blocks and a partial last one
    shape, granularity, channel_axis, block_axis, group_size = layout
    w = _weights(shape, seed=bits)
    args = dict(bits=bits, symmetric=symmetric, zero_bits=None if symmetric else min(2, bits),
                scale_bits=5 if bits < 8 else 8, granularity=granularity,
                channel_axis=channel_axis, block_axis=block_axis, group_size=group_size,
                method=method)
    plain = quantize_coded(w, **args)
    got, error = quantize_coded_measured(w, **args)
    np.testing.assert_array_equal(got.codes, plain.codes)
    np.testing.assert_array_equal(got.scale_code.codes, plain.scale_code.codes)
    np.testing.assert_array_equal(got.scale.view(np.uint32), plain.scale.view(np.uint32))
    if symmetric:
        assert got.zero_point is None and plain.zero_point is None
    else:
        np.testing.assert_array_equal(got.zero_point, plain.zero_point)
    want = compare(w, plain.decode())
    assert error.count == want.count == w.size
    assert error.max_abs == want.max_abs  # the same decoded values: exact
    for field in ("sum_sq_ref", "sum_sq_err", "sum_sq_approx", "dot"):
        assert _close(getattr(error, field), getattr(want, field)), field


def test_an_all_zero_tensor_has_no_error() -> None:
    w = np.zeros((32, 16), np.float32)
    q, error = quantize_coded_measured(w, bits=4, symmetric=False, zero_bits=2, scale_bits=5,
                                       granularity="group", channel_axis=1, block_axis=0,
                                       group_size=16, method="mse")
    np.testing.assert_array_equal(q.decode(), w)
    assert (error.sum_sq_ref, error.sum_sq_err, error.max_abs, error.count) == (0, 0, 0, w.size)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_or_inf_gives_none(bad: float) -> None:
    w = _weights((32, 16), seed=1)
    w[5, 3] = bad
    assert quantize_coded_measured(w, bits=4, symmetric=False, zero_bits=2, scale_bits=5,
                                   granularity="group", channel_axis=1, block_axis=0,
                                   group_size=16, method="mse") is None


def test_selection_helpers_equal_np_where() -> None:
    rng = np.random.default_rng(3)
    best = rng.integers(0, 6, 5000).astype(np.float32)   # many ties
    new = rng.integers(0, 6, 5000).astype(np.float32)
    values = rng.integers(-2, 2, 5000).astype(np.float32)
    candidate = rng.integers(0, 32, 5000).astype(np.float32)
    want_best = np.where(new < best, new, best)
    want_values = np.where(new < best, candidate, values)
    want_scalar = np.where(new < best, np.float32(1), values)
    better, scratch = np.empty_like(best), np.empty_like(best)
    scalar_values = values.copy()
    coded._keep_better(new, best, better)
    coded._take(values, candidate, better, scratch)
    coded._take(scalar_values, np.float32(1), better, scratch)
    np.testing.assert_array_equal(best, want_best)
    np.testing.assert_array_equal(values, want_values)
    np.testing.assert_array_equal(scalar_values, want_scalar)


def test_covering_and_nearest_share_their_logarithm() -> None:
    rng = np.random.default_rng(4)
    scales = np.abs(rng.standard_normal(4000)).astype(np.float32) * 0.01
    scales[:50] = 0
    for bits in (4, 5, 8):
        grid = LogGrid.fit(scales, bits)
        covering, nearest = grid.covering_and_nearest(scales)
        np.testing.assert_array_equal(covering, grid.covering(scales))
        np.testing.assert_array_equal(nearest, grid.nearest(scales))
        # The smallest grid scale not below each scale (code 0 when none is).
        values = grid.values
        want = np.array([max([c for c in range(grid.cmax + 1) if values[c] >= s] or [0])
                         for s in scales], np.float32)
        np.testing.assert_array_equal(covering, want)


def _info(w: np.ndarray) -> TensorInfo:
    return TensorInfo("w", w.shape, w.dtype, True, 1, 0, "MatMul", "onnx")


@pytest.mark.parametrize("dtype", [np.dtype(np.float32), np.dtype(np.float16), BF16])
def test_pipeline_takes_the_measured_path_for_scale_codes(dtype) -> None:
    from modelpress.core.pipeline import encode_measured
    w = _weights((64, 48), seed=2).astype(dtype)
    stage = Quantize(bits=4)
    got = encode_measured(w, _info(w), [stage])
    assert got is not None
    encoded, error = got
    general = stage.apply(pipeline.Dense(w), _info(w))
    np.testing.assert_array_equal(encoded.codes, general.codes)
    reference = pipeline.measure_error(w, general)
    assert _close(error.sum_sq_err, reference.sum_sq_err) and error.max_abs == reference.max_abs
    assert encode_measured(w.astype(np.float64), _info(w), [stage]) is None
    assert encode_measured(w, _info(w), [stage, stage]) is None


def test_onnx_output_is_byte_identical_without_the_measured_path(tmp_path: Path,
                                                                 monkeypatch) -> None:
    src = matmul_model(tmp_path / "in.onnx", {"w1": _weights((64, 96), 5),
                                              "w2": _weights((96, 40), 6)})
    recipe = Recipe([Quantize(bits=4, scale_bits=5, all_layers=True)])
    measured = compress(src, tmp_path / "a.onnx", recipe, Options(min_elements=16))
    calls = []

    def general_only(array, info, stages):
        calls.append(info.name)
        return None

    monkeypatch.setattr(pipeline, "encode_measured", general_only)
    general = compress(src, tmp_path / "b.onnx", recipe, Options(min_elements=16))
    assert sorted(calls) == ["w1", "w2"]
    assert sha256(tmp_path / "a.onnx") == sha256(tmp_path / "b.onnx")
    for a, b in zip(measured.rows, general.rows, strict=True):
        assert (a.name, a.encoding, a.bytes_after) == (b.name, b.encoding, b.bytes_after)
        assert _close(a.error.sqnr_db, b.error.sqnr_db) and a.error.max_abs == b.error.max_abs


def test_nonfinite_tensor_still_reported_or_left(tmp_path: Path) -> None:
    w = _weights((64, 32), 7)
    w[3, 3] = np.nan
    src = write_safetensors(tmp_path / "in.safetensors", {"l.weight": w,
                                                          "m.weight": _weights((64, 32), 8)})
    recipe = Recipe([Quantize(bits=4, scale_bits=5, scheme="asym", group_size=16)])
    with pytest.raises(Exception, match="1 NaN/Inf values"):
        compress(src, tmp_path / "o.safetensors", recipe, Options(min_elements=16))
    report = compress(src, tmp_path / "o.safetensors", recipe,
                      Options(min_elements=16, allow_nonfinite=True))
    assert [r.name for r in report.rows] == ["m.weight"]
    assert any("l.weight: left as is (1 NaN/Inf values" in n for n in report.notes)


@pytest.mark.parametrize("symmetric", [False, True])
def test_widened_row_operands_give_the_broadcasts_results(symmetric: bool, monkeypatch) -> None:
    w = _weights((40, 96), seed=9)  # groups of 16 along rows: the row layout
    args = dict(bits=4, symmetric=symmetric, zero_bits=None if symmetric else 2, scale_bits=5,
                granularity="group", channel_axis=0, block_axis=1, group_size=16, method="mse")
    widened, error = quantize_coded_measured(w, **args)
    monkeypatch.setattr(coded, "_WIDEN_ROWS_UP_TO", 0)  # broadcast operands instead
    broadcast, reference = quantize_coded_measured(w, **args)
    np.testing.assert_array_equal(widened.codes, broadcast.codes)
    np.testing.assert_array_equal(widened.scale_code.codes, broadcast.scale_code.codes)
    if not symmetric:
        np.testing.assert_array_equal(widened.zero_point, broadcast.zero_point)
    assert error == reference
