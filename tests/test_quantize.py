"""Quantization: exact codes and scales on small inputs, error bounds, options."""

from __future__ import annotations

import numpy as np
import pytest

from modelpress import Dense, Quantize, Quantized, RecipeError, Sparse, TensorInfo, compare
from modelpress.core.quantize.stage import quantize_array

from conftest import rng_weights


def info_for(w: np.ndarray, channel_axis: int = 0, block_axis: int = 1) -> TensorInfo:
    return TensorInfo("w", w.shape, w.dtype, True, channel_axis, block_axis)


def test_int8_symmetric_per_channel_exact_codes() -> None:
    w = np.array([[1.0, -0.5, 0.25], [0.0, 2.0, -4.0]], np.float32)
    q = Quantize(bits=8, granularity="channel", method="rtn").apply(Dense(w), info_for(w))
    assert isinstance(q, Quantized)
    np.testing.assert_allclose(q.scale.reshape(-1), [1 / 127, 4 / 127], rtol=1e-7)
    assert q.codes.tolist() == [[127, -64, 32], [0, 64, -127]]
    assert q.zero_point is None
    assert q.nbytes == 6 + 2 * 4
    assert q.describe() == "int8 ch sym"


def test_asymmetric_codes_and_exact_zero() -> None:
    w = np.array([[0.0, 1.0, 2.0, 3.0]], np.float32)
    q = quantize_array(w, bits=2, symmetric=False, granularity="tensor", channel_axis=0,
                       block_axis=1, group_size=None, method="rtn", scale_dtype=np.float32)
    assert q.scale.reshape(-1).tolist() == [1.0]
    assert q.zero_point.reshape(-1).tolist() == [-2]
    assert q.codes.tolist() == [[-2, -1, 0, 1]]
    np.testing.assert_array_equal(q.decode(), w)


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_rtn_symmetric_error_bounded_by_half_a_step(bits: int) -> None:
    w = rng_weights(16, 96, seed=bits)
    q = Quantize(bits=bits, granularity="channel", method="rtn").apply(Dense(w), info_for(w))
    step = np.broadcast_to(q.scale, w.shape)
    assert np.all(np.abs(q.decode() - w) <= step / 2 + 1e-6)
    assert q.codes.min() >= -(2 ** (bits - 1)) and q.codes.max() <= 2 ** (bits - 1) - 1


def test_group_scales_follow_block_axis() -> None:
    w = rng_weights(70, 6)  # an ONNX MatMul weight [K, N]: blocks run along K (axis 0)
    info = TensorInfo("w", w.shape, w.dtype, True, channel_axis=1, block_axis=0)
    q = Quantize(bits=4, group_size=32).apply(Dense(w), info)
    assert q.scale.shape == (3, 6)  # ceil(70 / 32) groups per output column
    assert q.granularity == "group" and q.group_size == 32
    # Every group's largest magnitude maps within the grid.
    assert q.codes.min() >= -8 and q.codes.max() <= 7
    assert q.nbytes == 70 * 6 // 2 + 3 * 6 * 4


def test_mse_beats_rtn_at_four_bits() -> None:
    w = rng_weights(128, 256, seed=3)
    errors = {}
    for method in ("rtn", "mse"):
        q = Quantize(bits=4, group_size=32, method=method).apply(Dense(w), info_for(w))
        errors[method] = compare(w, q.decode()).rel_l2
    assert errors["mse"] < errors["rtn"] * 0.95


def test_scales_stored_in_model_dtype_and_codes_use_them() -> None:
    w = rng_weights(8, 64).astype(np.float16)
    q = Quantize(bits=8).apply(Dense(w), info_for(w))
    assert q.scale.dtype == np.float16
    # codes were computed against the fp16 scale, so rtn error stays within half a step of it
    step = np.broadcast_to(q.scale.astype(np.float32), w.shape)
    assert np.all(np.abs(q.decode() - w.astype(np.float32)) <= step / 2 + 1e-6)


def test_all_zero_tensor_quantizes_to_zero() -> None:
    w = np.zeros((4, 64), np.float32)
    q = Quantize(bits=4).apply(Dense(w), info_for(w))
    np.testing.assert_array_equal(q.decode(), w)


def _plan(stage: Quantize, fmt: str | None, shape=(256, 640), sensitive=None,
          share=None) -> tuple:
    info = TensorInfo("w", shape, np.dtype(np.float32), True, 0, 1, "linear", fmt, sensitive,
                      share)
    p = stage.plan(info)
    return (p.bits, p.symmetric, p.granularity, p.group_size, p.method, p.scale_bits,
            p.zero_bits)


def test_defaults_resolve_per_format_and_role() -> None:
    # safetensors (and unknown formats): compressed-tensors' layout, float scales.
    assert _plan(Quantize(), "safetensors") == (8, True, "channel", None, "rtn", 0, None)
    assert _plan(Quantize(bits=4), None) == (4, True, "group", 128, "mse", 0, None)
    assert _plan(Quantize(bits=8, group_size=32), "safetensors")[2:4] == ("group", 32)
    # ONNX: A16 below 8 bits; at 8 bits the plan holds the longest group the values may
    # choose (K=640 -> 128; see test_int8_grouping.py).
    assert _plan(Quantize(bits=4), "onnx") == (4, False, "group", 16, "mse", 5, 2)
    assert _plan(Quantize(), "onnx") == (8, True, "group", 128, "rtn", 8, None)
    assert _plan(Quantize(), "onnx", shape=(256, 64)) == (8, True, "group", 16, "rtn", 8, None)
    # An explicit group size is honoured, with 8-bit scale codes and full zero points.
    assert _plan(Quantize(bits=4, group_size=32), "onnx") == (4, False, "group", 32, "mse", 8, 4)
    # Backup precision for embeddings and heads: ONNX by default, safetensors when asked.
    assert _plan(Quantize(bits=4), "onnx", sensitive="head")[0] == 6
    assert _plan(Quantize(bits=4, all_layers=True), "onnx", sensitive="head")[0] == 4
    assert _plan(Quantize(bits=4), "safetensors", sensitive="embedding")[0] == 4
    assert _plan(Quantize(bits=4, backup_bits=8), "safetensors", sensitive="embedding")[0] == 8
    assert _plan(Quantize(bits=8), "onnx", sensitive="head")[0] == 8


@pytest.mark.parametrize("bits, share, expected", [
    (4, 0.03, 6), (4, 0.25, 6), (4, 0.26, 6), (4, 0.51, 5), (4, 0.58, 5), (4, 0.99, 5),
    (2, 0.25, 6), (2, 0.30, 5), (3, 0.40, 5), (3, 0.51, 4), (5, 0.9, 6)])
def test_default_backup_adds_at_most_one_bit_per_weight(bits: int, share: float,
                                                         expected: int) -> None:
    # The extra bits of the backup, averaged over the model, stay within BACKUP_BUDGET (1).
    got = _plan(Quantize(bits=bits), "onnx", sensitive="embedding", share=share)[0]
    assert got == expected
    assert (got - bits) * share <= 1.0


def test_explicit_backup_bits_are_applied_whatever_the_share() -> None:
    assert _plan(Quantize(bits=4, backup_bits=6), "onnx", sensitive="head", share=0.58)[0] == 6
    assert _plan(Quantize(bits=4, all_layers=True), "onnx", sensitive="head", share=0.58)[0] == 4


@pytest.mark.parametrize("kwargs, message", [
    ({"bits": 1}, "quantize: --bits must be >= 2, got 1"),
    ({"bits": 9}, "quantize: --bits must be <= 8, got 9"),
    ({"scheme": "odd"}, "quantize: --scheme must be one of sym, asym, got 'odd'"),
    ({"granularity": "channel", "group_size": 32},
     "quantize: --group-size applies only to --granularity group, not channel"),
    ({"bits": 4.5}, "quantize: --bits takes an integer, got 4.5"),
])
def test_bad_options_fail_in_constructor(kwargs: dict, message: str) -> None:
    with pytest.raises(RecipeError) as exc:
        Quantize(**kwargs)
    assert str(exc.value) == message


def test_quantize_keeps_sparsity_exact() -> None:
    w = rng_weights(8, 64)
    mask = np.abs(w) > 0.7
    sparse = Sparse(mask, Dense(np.where(mask, w, 0).astype(np.float32)))
    for scheme in ("sym", "asym"):
        out = Quantize(bits=4, scheme=scheme, group_size=16).apply(sparse, info_for(w))
        assert isinstance(out, Sparse) and isinstance(out.values, Quantized)
        decoded = out.decode()
        assert np.all(decoded[~mask] == 0.0)
        np.testing.assert_array_equal(out.mask, mask)


@pytest.mark.parametrize("fmt", ["onnx", "safetensors"])
@pytest.mark.parametrize("group_size", [32, 128])
def test_mse_beats_rtn_on_the_sample_transformer(tmp_path, fmt: str, group_size: int) -> None:
    from modelpress import Recipe, compress
    from conftest import SAMPLES
    errors = {}
    for method in ("rtn", "mse"):
        report = compress(SAMPLES / f"transformer.{fmt}", tmp_path / f"{method}.{fmt}",
                          Recipe([Quantize(bits=4, group_size=group_size, method=method)]))
        errors[method] = report.weight_error
        sizes = sum(r.bytes_after for r in report.rows)
    assert errors["mse"].rel_l2 < errors["rtn"].rel_l2
    assert errors["mse"].sqnr_db > errors["rtn"].sqnr_db + 0.3
    assert sizes > 0


def test_two_bit_codes_stay_in_range_and_pack_densely(tmp_path) -> None:
    from modelpress import Recipe, compress, decompress
    from modelpress.formats import open_model
    from conftest import write_safetensors
    w = rng_weights(48, 200, seed=6)
    src = write_safetensors(tmp_path / "w.safetensors", {"fc.weight": w})
    report = compress(src, tmp_path / "o.safetensors",
                      Recipe([Quantize(bits=2, scheme="asym", group_size=32)]))
    store = open_model(tmp_path / "o.safetensors")
    tree = store.decode("fc.weight")
    assert tree.codes.min() >= -2 and tree.codes.max() <= 1
    assert store.tensors["fc.weight.mp_codes"].shape == (48 * 200 * 2 // 8,)
    assert report.rows[0].bytes_after == 48 * 200 // 4 + tree.scale.nbytes + tree.zero_point.nbytes
    decompress(tmp_path / "o.safetensors", tmp_path / "d.safetensors")
    assert compare(w, open_model(tmp_path / "d.safetensors").read("fc.weight")).rel_l2 == \
        pytest.approx(report.rows[0].error.rel_l2, rel=1e-6)
