"""The fused per-channel rtn path gives the general path's codes, scales, bytes and errors."""

from __future__ import annotations

import math
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import modelpress.core.pipeline as pipeline
from modelpress import Quantize, Recipe
from modelpress.app.api import compress
from modelpress.core.dtypes import scale_dtype_for
from modelpress.core.pipeline import Options, measure_error
from modelpress.core.quantize.stage import quantize_array
from modelpress.core.quantize.fused import quantize_channels
from conftest import SAMPLES, sha256, write_safetensors

BF16 = np.dtype(ml_dtypes.bfloat16)
RTN8 = ["quantize", "--bits", "8", "--granularity", "channel", "--method", "rtn"]


def _weights(shape: tuple[int, ...], dtype: np.dtype, seed: int) -> np.ndarray:
    """Normal weights with awkward rows: all zero, all negative, one huge value, -0.0."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal(shape) * 0.05).astype(np.float32)
    w[0] = 0.0
    if shape[0] > 3:
        w[1] = -np.abs(w[1])
        w[2].flat[-1] = 3e3
        w[3] = -0.0
    return w.astype(dtype)


def _close(a: float, b: float) -> bool:
    return a == b or math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-12)


@pytest.mark.parametrize("dtype", [np.dtype(np.float32), np.dtype(np.float16), BF16])
@pytest.mark.parametrize("shape", [(37, 300), (7, 5), (12, 3, 3, 5), (3, 70000)])
@pytest.mark.parametrize("bits", [8, 4, 2])
def test_matches_quantize_array_and_measure_error(dtype, shape, bits, monkeypatch) -> None:
    # Small blocks, so one tensor spans many blocks and a partial last one.
    monkeypatch.setattr("modelpress.core.quantize.fused.BLOCK_ELEMENTS", 1000)
    w = _weights(shape, dtype, seed=bits)
    scale_dtype = scale_dtype_for(dtype)
    got, error = quantize_channels(w, bits, scale_dtype)
    want = quantize_array(w.astype(np.float32), bits=bits, symmetric=True, granularity="channel",
                          channel_axis=0, block_axis=w.ndim - 1, group_size=None, method="rtn",
                          scale_dtype=scale_dtype)
    assert got.codes.dtype == want.codes.dtype and got.codes.shape == want.codes.shape
    np.testing.assert_array_equal(got.codes, want.codes)
    assert got.scale.dtype == want.scale.dtype and got.scale.shape == want.scale.shape
    np.testing.assert_array_equal(got.scale.view(np.uint8), want.scale.view(np.uint8))
    assert (got.granularity, got.channel_axis, got.zero_point) == ("channel", 0, None)
    reference = measure_error(w, want)
    for field in ("sum_sq_ref", "sum_sq_err", "sum_sq_approx", "dot", "max_abs"):
        assert _close(getattr(error, field), getattr(reference, field)), field
    assert error.count == reference.count == w.size


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("dtype", [np.dtype(np.float32), BF16])
def test_nonfinite_tensor_is_left_to_the_general_path(dtype, bad) -> None:
    w = _weights((20, 64), np.dtype(np.float32), seed=1)
    w[17, 3] = bad
    assert quantize_channels(w.astype(dtype), 8, scale_dtype_for(dtype)) is None


def test_values_near_float32_max_give_the_general_paths_codes() -> None:
    w = _weights((6, 50), np.dtype(np.float32), seed=2)
    w[4, :3] = (3.3e38, -3.4e38, 1e38)
    got, error = quantize_channels(w, 8, np.dtype(np.float32))
    want = quantize_array(w, bits=8, symmetric=True, granularity="channel", channel_axis=0,
                          block_axis=1, group_size=None, method="rtn",
                          scale_dtype=np.dtype(np.float32))
    np.testing.assert_array_equal(got.codes, want.codes)
    # Sums that overflow float32 are redone in float64 (issue 15, item 13): finite, and the same
    # on both paths.
    general = measure_error(w, want)
    assert math.isfinite(error.sum_sq_ref)
    assert (error.sum_sq_ref, error.sum_sq_err) == (general.sum_sq_ref, general.sum_sq_err)


def _compress(src: Path, dst: Path, recipe: Recipe, threads: int) -> dict[str, tuple]:
    report = compress(src, dst, recipe, Options(threads=threads))
    return {row.name: (row.encoding, row.bytes_after, row.error) for row in report.rows}


@pytest.mark.parametrize("model", ["mlp", "cnn", "transformer"])
def test_sample_outputs_are_byte_identical_without_the_fused_path(tmp_path: Path, model: str,
                                                                   monkeypatch) -> None:
    recipe = Recipe([Quantize(bits=8, granularity="channel", method="rtn")])
    src = SAMPLES / f"{model}.safetensors"
    fused = _compress(src, tmp_path / "fused.safetensors", recipe, threads=2)
    calls = []

    def switched_off(*args):
        calls.append(args[1].name)
        return None

    monkeypatch.setattr(pipeline, "encode_measured", switched_off)
    general = _compress(src, tmp_path / "general.safetensors", recipe, threads=2)
    assert sorted(calls) == sorted(fused)  # every quantized tensor took the general path
    assert sha256(tmp_path / "fused.safetensors") == sha256(tmp_path / "general.safetensors")
    assert fused.keys() == general.keys() and fused
    for name, (label, size, error) in fused.items():
        assert (label, size) == general[name][:2]
        ref = general[name][2]
        assert _close(error.rel_l2, ref.rel_l2) and _close(error.max_abs, ref.max_abs), name


@pytest.mark.parametrize("dtype", [np.dtype(np.float32), BF16, np.dtype(np.float16)])
def test_random_checkpoint_is_byte_identical_without_the_fused_path(tmp_path: Path, dtype,
                                                                    monkeypatch) -> None:
    tensors = {"embed.weight": _weights((300, 64), dtype, 3),
               "layer.q.weight": _weights((64, 64), dtype, 4),
               "layer.conv.weight": _weights((16, 8, 3, 3), dtype, 5),
               "layer.odd.weight": _weights((33, 131), dtype, 6),
               "norm.weight": np.ones(64, dtype=dtype)}
    src = write_safetensors(tmp_path / "in.safetensors", tensors)
    recipe = Recipe([Quantize(bits=8, granularity="channel", method="rtn")])
    opts = Options(min_elements=16)
    fused = compress(src, tmp_path / "a.safetensors", recipe, opts)
    monkeypatch.setattr(pipeline, "encode_measured", lambda *a: None)
    general = compress(src, tmp_path / "b.safetensors", recipe, opts)
    assert sha256(tmp_path / "a.safetensors") == sha256(tmp_path / "b.safetensors")
    assert len(fused.rows) == len(general.rows) == 4
    for a, b in zip(fused.rows, general.rows):
        assert (a.name, a.encoding, a.bytes_after) == (b.name, b.encoding, b.bytes_after)
        assert _close(a.error.sqnr_db, b.error.sqnr_db) and _close(a.error.cosine, b.error.cosine)


def test_other_recipes_take_the_general_path() -> None:
    from modelpress.core.pipeline import encode_measured
    from modelpress.formats.safetensors.store import SafetensorsStore
    store = SafetensorsStore(SAMPLES / "mlp.safetensors")
    name = next(n for n, i in store.tensors.items() if len(i.shape) == 2)
    info, w = store.tensors[name], store.read(name)
    assert encode_measured(w, info, [Quantize(bits=8, granularity="channel",
                                                method="rtn")]) is not None
    for stage in (Quantize(bits=4), Quantize(bits=8, method="mse"),
                  Quantize(bits=8, granularity="group", group_size=32),
                  Quantize(bits=8, scheme="asym", granularity="channel", method="rtn")):
        assert encode_measured(w, info, [stage]) is None
    rtn = Quantize(bits=8, granularity="channel", method="rtn")
    assert encode_measured(w, info, [rtn, rtn]) is None
    assert encode_measured(w.astype(np.float64), info, [rtn]) is None
