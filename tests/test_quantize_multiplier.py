"""Group scales as integer multipliers of a float16 base per super-block (`--super-block`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from modelpress import Quantize, Recipe, compare, compress, decompress
from modelpress.core.errors import ModelpressError
from modelpress.core.quantize.coded import quantize_coded, quantize_coded_measured
from modelpress.core.quantize.plan import MULTIPLIER_MIN_WEIGHTS
from modelpress.core.scalecode import MultiplierCode, ScaleCode, max_multiplier
from modelpress.core.tensorinfo import TensorInfo
from modelpress.formats import open_model
from modelpress.formats.onnx.sites import KERNEL8_MIN_WEIGHTS
from modelpress.formats.onnx.options import OnnxTarget, OnnxWriteOptions

from conftest import matmul_model, ort_run, rng_weights, run_cli, write_safetensors
from test_onnx_io import dequantized, optimized_ops

ARGS = dict(bits=4, symmetric=False, zero_bits=2, scale_bits=5, granularity="group",
            channel_axis=1, block_axis=0, group_size=16)


def _sqnr(w: np.ndarray, approx: np.ndarray) -> float:
    w64 = w.astype(np.float64)
    return 10 * np.log10((w64 ** 2).sum() / ((approx - w64) ** 2).sum())


def _heavy(k: int, n: int, seed: int) -> np.ndarray:
    """Student-t weights with a few large columns: skewed, outlier-prone groups."""
    rng = np.random.default_rng(seed)
    w = rng.standard_t(4, size=(k, n)).astype(np.float32) * 0.02
    w[:, :3] *= 8
    return w


def test_multiplier_limit_keeps_every_product_in_int8() -> None:
    assert max_multiplier(4, 2) == 14      # |code - zero| reaches 9
    assert max_multiplier(4, None) == 15   # symmetric: |code| <= 8, capped at 4 bits
    assert max_multiplier(3, 2) == 15
    assert max_multiplier(2, 2) == 15
    for bits, zero_bits in [(4, 2), (4, None), (3, 2), (3, 3), (2, 2), (4, 4)]:
        limit = max_multiplier(bits, zero_bits)
        qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        zmax = 0 if zero_bits is None else (1 << (zero_bits - 1))
        reach = max(qmax + zmax, zmax - 1 - qmin) if zero_bits else -qmin
        assert limit * reach <= 127


@pytest.mark.parametrize("method", ["mse", "rtn"])
@pytest.mark.parametrize("make", [lambda: rng_weights(512, 96, seed=1),
                                  lambda: _heavy(384, 80, seed=2)])
def test_layout_decodes_exactly_as_base_times_small_integers(make, method: str) -> None:
    w = make()
    q = quantize_coded(w, super_block=128, method=method, **ARGS)
    code = q.scale_code
    assert isinstance(code, MultiplierCode) and q.super_block == 128
    assert code.base.dtype == np.float16 and code.base.shape == (w.shape[0] // 128, w.shape[1])
    assert code.multipliers.shape == q.scale.shape == (w.shape[0] // 16, w.shape[1])
    assert code.multipliers.min() >= 1 and code.multipliers.max() <= 14
    # Each weight is base * Q with Q = m * (code - zero) an int8 value: one blocked
    # 8-bit DequantizeLinear per super-block gives exactly Quantized.decode().
    spread = lambda a: np.repeat(a.astype(np.int32), 16, axis=0)  # noqa: E731
    wide = spread(code.multipliers) * (q.codes.astype(np.int32) - spread(q.zero_point))
    assert np.abs(wide).max() <= 127
    base = np.repeat(code.base.astype(np.float32), 128, axis=0)
    np.testing.assert_array_equal((wide.astype(np.float32) * base), q.decode())
    np.testing.assert_array_equal(q.scale, code.decode())
    assert q.side_nbytes * 8 / w.size == pytest.approx((4 + 2) / 16 + 16 / 128)


def test_rtn_grid_covers_every_group() -> None:
    w = _heavy(256, 64, seed=4)
    q = quantize_coded(w, super_block=128, method="rtn", **ARGS)
    step = q.expand(q.scale)
    assert np.all(np.abs(q.decode() - w) <= step / 2 * (1 + 1e-6))


@pytest.mark.parametrize("make", [lambda: rng_weights(768, 256, seed=5),
                                  lambda: _heavy(512, 128, seed=6)])
def test_error_close_to_log_grid_codes_and_better_than_rtn(make) -> None:
    w = make()
    log_grid = _sqnr(w, quantize_coded(w, method="mse", **ARGS).decode())
    multiplied = _sqnr(w, quantize_coded(w, super_block=128, method="mse", **ARGS).decode())
    rtn = _sqnr(w, quantize_coded(w, super_block=128, method="rtn", **ARGS).decode())
    assert multiplied > log_grid - 0.25
    assert multiplied > rtn + 0.5


def test_measured_matches_compare_and_codes() -> None:
    w = _heavy(256, 96, seed=7)
    q = quantize_coded(w, super_block=128, method="mse", **ARGS)
    measured, stats = quantize_coded_measured(w, super_block=128, method="mse", **ARGS)
    np.testing.assert_array_equal(measured.codes, q.codes)
    np.testing.assert_array_equal(measured.scale, q.scale)
    expected = compare(w, q.decode())
    assert stats.max_abs == expected.max_abs
    assert stats.rel_l2 == pytest.approx(expected.rel_l2, rel=1e-5)


def test_untiled_or_out_of_range_tensors_keep_log_grid_codes() -> None:
    ragged = rng_weights(200, 64, seed=8)       # 200 inputs: not whole super-blocks
    assert isinstance(quantize_coded(ragged, super_block=128, method="mse",
                                     **ARGS).scale_code, ScaleCode)
    tiny = rng_weights(256, 64, seed=9) * np.float32(1e-9)  # bases under float16's range
    q, stats = quantize_coded_measured(tiny, super_block=128, method="mse", **ARGS)
    assert isinstance(q.scale_code, ScaleCode)
    assert stats.rel_l2 == pytest.approx(compare(tiny, q.decode()).rel_l2, rel=1e-5)


def _info(shape: tuple[int, ...], fmt: str = "onnx", role: str = "MatMul") -> TensorInfo:
    return TensorInfo("w", shape, np.dtype(np.float32), weight_like=True, channel_axis=1,
                      block_axis=0, role=role, format=fmt)


def test_default_plan_uses_multipliers_only_where_the_kernel_runs_them() -> None:
    assert MULTIPLIER_MIN_WEIGHTS == KERNEL8_MIN_WEIGHTS
    big = (1024, 1024)
    assert Quantize(bits=4).plan(_info(big)).super_block == 128
    assert Quantize(bits=3).plan(_info(big)).super_block == 128
    assert Quantize(bits=4).plan(_info((512, 1024))).super_block == 0   # under 1M weights
    assert Quantize(bits=4).plan(_info(big, role="Conv")).super_block == 0
    assert Quantize(bits=4, scale_bits=5).plan(_info(big)).super_block == 0
    assert Quantize(bits=4, group_size=32).plan(_info(big)).super_block == 128
    assert Quantize(bits=4, group_size=128).plan(_info(big)).super_block == 0
    assert Quantize(bits=4, group_size=48).plan(_info(big)).super_block == 0
    assert Quantize(bits=5).plan(_info(big)).super_block == 0
    assert Quantize(bits=4).plan(_info(big, fmt="safetensors")).super_block == 0
    given = Quantize(bits=4, super_block=64).plan(_info((64, 32), fmt="safetensors",
                                                        role="linear"))
    assert (given.super_block, given.group_size, given.scale_bits, given.symmetric,
            given.zero_bits) == (64, 16, 5, False, 2)
    assert Quantize(bits=4, super_block=0).plan(_info(big)).super_block == 0


@pytest.mark.parametrize("options, message", [
    (dict(bits=8, super_block=128), "--bits 2-4"),
    (dict(bits=4, super_block=128, scale_bits=0), "--scale-bits 0"),
    (dict(bits=4, super_block=128, granularity="channel"), "group"),
    (dict(bits=4, super_block=100), "multiple of the group size 16"),
    (dict(bits=4, super_block=128, group_size=48), "multiple of the group size 48"),
])
def test_impossible_options_are_refused(options: dict, message: str) -> None:
    with pytest.raises(ModelpressError, match=message):
        Quantize(**options)


def test_onnx_weight_runs_in_the_8bit_kernel_and_decodes_exactly(tmp_path: Path) -> None:
    w1, w2 = rng_weights(1024, 1024, seed=10), rng_weights(1024, 64, seed=11)
    src = matmul_model(tmp_path / "m.onnx", {"w1": w1, "w2": w2})
    dst = tmp_path / "o.onnx"
    compress(src, dst, Recipe([Quantize(bits=4, all_layers=True)]))
    model = onnx.load(str(dst))
    onnx.checker.check_model(model, full_check=True)
    dq = {n.output[0]: n for n in model.graph.node if n.op_type == "DequantizeLinear"}
    assert sorted(dq) == ["w1"]        # w2 (64K weights) is decoded at load
    assert {a.name: a.i for a in dq["w1"].attribute} == {"axis": 0, "block_size": 128}
    store = open_model(dst)
    q1, q2 = store.decode("w1"), store.decode("w2")
    assert isinstance(q1.scale_code, MultiplierCode) and isinstance(q2.scale_code, ScaleCode)
    decoded = q1.decode()
    # onnxruntime's own evaluation of the chain and DequantizeLinear gives the same weight.
    np.testing.assert_array_equal(dequantized(dst, "w1"), decoded)
    ops = optimized_ops(dst, tmp_path)
    assert ops.count("MatMulNBits") == 1 and ops.count("MatMul") == 1
    fused = onnx.load(str(tmp_path / "optimized.onnx"))
    kernel = next(n for n in fused.graph.node if n.op_type == "MatMulNBits")
    attrs = {a.name: a.i for a in kernel.attribute}
    assert (attrs["bits"], attrs["block_size"]) == (8, 128)
    x = np.random.default_rng(12).standard_normal((5, 1024)).astype(np.float32)
    ref = x @ decoded @ q2.decode()
    exact = ort_run(dst, {"x": x}, exact=True)[0]
    np.testing.assert_allclose(exact, ref, rtol=1e-4, atol=1e-3)
    got = ort_run(dst, {"x": x})[0]     # int8 activations (accuracy level 4)
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.02
    # Size: 4.5 bits per weight for w1.
    assert dst.stat().st_size < 1024 * 1024 * 4.5 / 8 + 64 * 1024 * 4.5 / 8 + 8000
    dense = tmp_path / "dense.onnx"
    decompress(dst, dense)
    back = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(dense)).graph.initializer}
    np.testing.assert_array_equal(back["w1"], decoded)


def test_folded_form_and_gemm_trans_b(tmp_path: Path) -> None:
    from test_onnx_forms import _gemm_model
    w, bias = rng_weights(64, 256, seed=13), rng_weights(64, seed=14)
    src = _gemm_model(tmp_path / "m.onnx", w, bias, None)
    recipe = Recipe([Quantize(bits=4, all_layers=True, super_block=128)])
    x = np.random.default_rng(15).standard_normal((4, 256)).astype(np.float32)
    for mode, kernel in [("fold", False), ("kernel", True)]:
        dst = tmp_path / f"{mode}.onnx"
        compress(src, dst, recipe, onnx_options=OnnxWriteOptions(target=OnnxTarget(int4=mode)))
        q = open_model(dst).decode("w")
        assert isinstance(q.scale_code, MultiplierCode) and q.shape == (64, 256)
        ops = optimized_ops(dst, tmp_path)
        assert ("MatMulNBits" in ops) == kernel
        np.testing.assert_allclose(ort_run(dst, {"x": x}, exact=True)[0],
                                   x @ q.decode().T + bias, rtol=1e-4, atol=1e-4)


def test_safetensors_round_trip_and_label(tmp_path: Path) -> None:
    w = _heavy(96, 256, seed=16)   # [out, in]: groups along the 256 inputs
    src = write_safetensors(tmp_path / "m.safetensors", {"layer.weight": w})
    dst = tmp_path / "o.safetensors"
    result = run_cli(["compress", str(src), "-o", str(dst), "quantize", "--bits", "4",
                      "--super-block", "128"])
    assert result.exit_code == 0, result.output
    q = open_model(dst).decode("layer.weight")
    assert isinstance(q.scale_code, MultiplierCode)
    assert q.describe() == "int4 g16 asym m4x128 z2"
    expected = quantize_coded(w, super_block=128, method="mse", **dict(ARGS, channel_axis=0,
                                                                      block_axis=1))
    assert q.scale_code.axis == 1
    assert _sqnr(w, q.decode()) == pytest.approx(_sqnr(w, expected.decode()), abs=0.3)
    back = tmp_path / "back.safetensors"
    assert run_cli(["decompress", str(dst), "-o", str(back)]).exit_code == 0
    from safetensors.numpy import load_file
    np.testing.assert_array_equal(load_file(str(back))["layer.weight"], q.decode())


def test_large_models_keep_multiplier_weights_in_the_4bit_kernel(tmp_path: Path,
                                                                  monkeypatch) -> None:
    # Widening at load costs onnxruntime a few bytes per weight while it folds; past
    # WIDEN_MAX_WEIGHTS the same encoding is written in the 4-bit kernel form.
    import modelpress.formats.onnx.sites as sites
    monkeypatch.setattr(sites, "WIDEN_MAX_WEIGHTS", (1 << 20) - 1)
    w1 = rng_weights(1024, 1024, seed=17)
    src = matmul_model(tmp_path / "m.onnx", {"w1": w1})
    dst = tmp_path / "o.onnx"
    # (--onnx-int4 auto would fold a 4-bit kernel weight under 4M elements.)
    compress(src, dst, Recipe([Quantize(bits=4, all_layers=True)]),
             onnx_options=OnnxWriteOptions(target=OnnxTarget(int4="kernel")))
    model = onnx.load(str(dst))
    dq = next(n for n in model.graph.node if n.op_type == "DequantizeLinear")
    assert {a.name: a.i for a in dq.attribute} == {"axis": 0, "block_size": 16}
    codes = {t.name: t for t in model.graph.initializer}[dq.input[0]]
    assert codes.data_type == onnx.TensorProto.UINT4 and list(codes.dims) == [1024, 1024]
    q = open_model(dst).decode("w1")
    assert isinstance(q.scale_code, MultiplierCode)
    np.testing.assert_array_equal(dequantized(dst, "w1"), q.decode())
    fused = optimized_ops(dst, tmp_path)
    assert fused == ["MatMulNBits"]
    kernel = next(n for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node)
    assert {a.name: a.i for a in kernel.attribute}["bits"] == 4
    # The same tensor as the default (widened) writer gives it.
    monkeypatch.setattr(sites, "WIDEN_MAX_WEIGHTS", 1 << 28)
    compress(src, tmp_path / "w.onnx", Recipe([Quantize(bits=4, all_layers=True)]))
    np.testing.assert_array_equal(open_model(tmp_path / "w.onnx").decode("w1").codes, q.codes)


def test_pruned_weights_stay_exact_zeros_in_the_8bit_kernel(tmp_path: Path) -> None:
    from modelpress import Prune
    w = rng_weights(1024, 1024, seed=18)
    src = matmul_model(tmp_path / "m.onnx", {"w1": w})
    dst = tmp_path / "o.onnx"
    compress(src, dst, Recipe([Prune(pattern="2:4"), Quantize(bits=4, all_layers=True)]))
    encoded = open_model(dst).decode("w1")
    decoded = encoded.decode()
    q = getattr(encoded, "values", encoded)   # pruned codes hold the zero point in ONNX
    assert isinstance(q.scale_code, MultiplierCode)
    assert int((decoded == 0).sum()) >= decoded.size // 2
    np.testing.assert_array_equal(dequantized(dst, "w1"), decoded)
    assert "MatMulNBits" in optimized_ops(dst, tmp_path)
