"""Quantization with scales stored as codes on a per-tensor log grid (double quantization)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from modelpress import Quantize, Recipe, compare, compress, decompress
from modelpress.core.encoded import Dense
from modelpress.core.quantize.stage import quantize_array
from modelpress.core.quantize.coded import quantize_coded
from modelpress.core.scalecode import LogGrid, decode_codes
from modelpress.core.tensorinfo import TensorInfo
from modelpress.formats import open_model

from conftest import rng_weights, write_safetensors


def _a16(w: np.ndarray, method: str = "mse"):
    return quantize_coded(w, bits=4, symmetric=False, zero_bits=2, scale_bits=5,
                          granularity="group", channel_axis=0, block_axis=1, group_size=16,
                          method=method)


def test_grid_tables_multiply_to_every_code() -> None:
    grid = LogGrid.fit(np.array([0.5, 0.01, 0.2, 0.03], np.float32), 5)
    assert grid.high.shape == (8,) and grid.low.shape == (4,)
    codes = np.arange(32)
    expected = (grid.high[codes >> 2] * grid.low[codes & 3]).astype(np.float32)
    np.testing.assert_array_equal(decode_codes(codes, grid.high, grid.low, 5), expected)
    assert grid.values[0] >= np.float32(0.5)          # code 0 covers the largest scale
    assert np.all(np.diff(grid.values) < 0)           # strictly decreasing


def test_a16_layout_bytes_and_ranges() -> None:
    w = rng_weights(96, 200, seed=3)
    q = _a16(w)
    assert q.describe() == "int4 g16 asym s5 z2"
    assert q.codes.min() >= -8 and q.codes.max() <= 7
    assert q.zero_point.min() >= -2 and q.zero_point.max() <= 1
    assert q.scale.shape == (96, 13) and q.scale_code.codes.shape == (96, 13)
    np.testing.assert_array_equal(q.scale, q.scale_code.decode())
    groups = 96 * 13
    assert q.nbytes == math.ceil(w.size * 4 / 8) + math.ceil(groups * 7 / 8) + (8 + 4) * 4


def test_rtn_never_clips() -> None:
    w = rng_weights(64, 128, seed=4) * np.linspace(0.01, 3, 128, dtype=np.float32)
    q = _a16(w, method="rtn")
    err = np.abs(q.decode() - w)
    assert np.all(err <= q.expand(q.scale) * 0.5 * (1 + 1e-5))


def test_a16_beats_float_scaled_groups_of_32_at_fewer_bits() -> None:
    w = np.random.default_rng(5).standard_t(5, (512, 512)).astype(np.float32)
    ours = _a16(w)
    plain = quantize_array(w, bits=4, symmetric=True, granularity="group", channel_axis=0,
                           block_axis=1, group_size=32, method="mse",
                           scale_dtype=np.dtype(np.float16))
    assert ours.nbytes < plain.nbytes                 # 4.44 vs 4.5 bits per weight
    assert compare(w, ours.decode()).sqnr_db > compare(w, plain.decode()).sqnr_db + 1.0


def test_all_zero_and_constant_groups_decode_exactly() -> None:
    w = np.zeros((4, 64), np.float32)
    w[1] = 0.25
    np.testing.assert_array_equal(_a16(w).decode(), w)


def test_quantize_stage_with_scale_bits_on_any_format() -> None:
    w = rng_weights(32, 64, seed=6)
    info = TensorInfo("w", w.shape, w.dtype, True, 0, 1, "linear", "safetensors")
    q = Quantize(bits=8, scale_bits=8, group_size=32).apply(Dense(w), info)
    assert q.describe() == "int8 g32 sym s8"
    assert compare(w, q.decode()).rel_l2 < 0.01


@pytest.mark.parametrize("stage", [Quantize(bits=4, scale_bits=5, scheme="asym", group_size=16),
                                   Quantize(bits=8, scale_bits=8, group_size=32)])
def test_safetensors_scale_codes_round_trip(tmp_path: Path, stage: Quantize) -> None:
    w = rng_weights(48, 96, seed=7)
    src = write_safetensors(tmp_path / "in.safetensors", {"l.weight": w})
    report = compress(src, tmp_path / "o.safetensors", Recipe([stage]))
    store = open_model(tmp_path / "o.safetensors")
    assert store.encodings["l.weight"]["layout"] == "modelpress"   # not compressed-tensors'
    decoded = store.decode("l.weight").decode()
    assert compare(w, decoded).rel_l2 == pytest.approx(report.rows[0].error.rel_l2, rel=1e-6)
    decompress(tmp_path / "o.safetensors", tmp_path / "d.safetensors")
    np.testing.assert_array_equal(open_model(tmp_path / "d.safetensors").read("l.weight"),
                                  decoded)


@pytest.mark.parametrize("method,symmetric", [("mse", False), ("rtn", False), ("mse", True)])
def test_groups_along_an_inner_axis_match_the_row_layout(method: str, symmetric: bool) -> None:
    # [in, out] weights (groups along axis 0) take the stacked path; their transpose
    # takes the row path: the same groups must get the same codes, scales and zeros.
    w = rng_weights(96, 40, seed=5) * np.exp(rng_weights(1, 40, seed=6))
    args = dict(bits=4, symmetric=symmetric, zero_bits=None if symmetric else 2, scale_bits=5,
                granularity="group", group_size=16, method=method)
    stacked = quantize_coded(w, channel_axis=1, block_axis=0, **args)
    rows = quantize_coded(np.ascontiguousarray(w.T), channel_axis=0, block_axis=1, **args)
    np.testing.assert_array_equal(stacked.codes, rows.codes.T)
    np.testing.assert_array_equal(stacked.scale_code.codes, rows.scale_code.codes.T)
    np.testing.assert_array_equal(stacked.scale, rows.scale.T)
    if not symmetric:
        np.testing.assert_array_equal(stacked.zero_point, rows.zero_point.T)
    assert stacked.scale.shape == (6, 40)


def test_group_decode_broadcasts_like_the_expanded_form() -> None:
    q = quantize_coded(rng_weights(4, 48, 24, seed=2), bits=4, symmetric=False, zero_bits=2,
                       scale_bits=5, granularity="group", channel_axis=0, block_axis=1,
                       group_size=16, method="mse")
    expanded = (q.codes.astype(np.float32) - q.expand(q.zero_point.astype(np.float32))) \
        * q.expand(q.scale.astype(np.float32))
    np.testing.assert_array_equal(q.decode().view(np.uint32), expanded.view(np.uint32))
