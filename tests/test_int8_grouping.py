"""8-bit ONNX group sizes chosen per tensor by rate and distortion (compress_core/quantize/grouping.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from modelpress import Dense, Quantize, Recipe, TensorInfo, compare, compress
from modelpress.app.batch.plan import dry_run, plan_batch
from modelpress.core.estimate import estimate
from modelpress.core.quantize.coded import quantize_coded
from modelpress.core.quantize.grouping import (KERNEL8_MIN_BLOCK, KERNEL8_MIN_WEIGHTS, PRICE,
                                               candidate_groups, candidates, choose_group,
                                               former_group)
from modelpress.formats import open_model
from modelpress.formats.onnx import sites

from conftest import matmul_model, ort_run, rng_weights, run_cli, sha256


def outlier_rows(k: int = 512, n: int = 64, seed: int = 0) -> np.ndarray:
    """A MatMul weight [K, N] with 8 input rows (of 512) 40x larger than the rest, as the
    outlier input channels of trained transformers."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)).astype(np.float32) * 0.02
    w[rng.choice(k, 8, replace=False)] *= 40
    return w


def matmul_info(w: np.ndarray, **extra) -> TensorInfo:
    return TensorInfo("w", w.shape, w.dtype, True, 1, 0, role="MatMul", format="onnx", **extra)


def exact(w: np.ndarray, group: int) -> tuple[float, int]:
    """Relative squared error and bytes of `w` in symmetric 8-bit groups with 8-bit codes."""
    q = quantize_coded(w, bits=8, symmetric=True, zero_bits=None, scale_bits=8,
                       granularity="group", channel_axis=1, block_axis=0, group_size=group,
                       method="rtn")
    return compare(w, q.decode()).rel_l2 ** 2, q.nbytes


def test_outlier_rows_get_shorter_groups_that_beat_the_former_rule_at_their_byte_cost() -> None:
    w = outlier_rows()
    info = matmul_info(w, mean_weight_size=float(w.size))
    chosen, former = choose_group(w, info, bits=8, scale_bits=8, zero_bits=None), former_group(512)
    assert (chosen, former) == (8, 128)
    (error, size), (old_error, old_size) = exact(w, chosen), exact(w, former)
    assert error < 0.1 * old_error      # measured: 0.084x, for 11.6% more bytes
    # Worth its bytes at the chooser's own price, with exact errors and byte counts.
    assert error + PRICE * 8 * size / w.size < old_error + PRICE * 8 * old_size / w.size


def test_evenly_spread_weights_get_longer_groups() -> None:
    w = rng_weights(512, 64) * 0.02
    # Groups of 64 instead of 128: 15% less squared error for 0.06 more bits per weight.
    assert choose_group(w, matmul_info(w, mean_weight_size=float(w.size)), bits=8,
                        scale_bits=8, zero_bits=None) == 64


def test_estimated_errors_follow_the_exact_ones() -> None:
    w = outlier_rows(seed=3)
    for candidate in candidates(w, matmul_info(w), bits=8, scale_bits=8, zero_bits=None):
        assert candidate.error == pytest.approx(exact(w, candidate.group_size)[0], rel=0.1)


def test_candidates_stop_at_the_former_rule_and_start_at_the_kernels_block() -> None:
    assert candidate_groups(matmul_info(np.zeros((64, 8), np.float32)), 64) == [4, 8, 16]
    assert candidate_groups(matmul_info(np.zeros((3, 8), np.float32)), 3) == [4]
    assert candidate_groups(matmul_info(np.zeros((512, 8), np.float32)), 512) == \
        [4, 8, 16, 32, 64, 128]
    big = TensorInfo("w", (1024, 1024), np.dtype(np.float32), True, 1, 0, role="MatMul",
                     format="onnx")
    assert candidate_groups(big, 1024) == [64, 128]
    # As the writer's conditions for onnxruntime's 8-bit kernel (formats/onnx/sites.py).
    assert (KERNEL8_MIN_WEIGHTS, KERNEL8_MIN_BLOCK) == (sites.KERNEL8_MIN_WEIGHTS,
                                                        sites.KERNEL8_MIN_BLOCK)


def test_a_tensor_of_zeros_keeps_the_former_group() -> None:
    w = np.zeros((512, 64), np.float32)
    assert choose_group(w, matmul_info(w), bits=8, scale_bits=8, zero_bits=None) == 128


def test_given_group_size_or_granularity_wins() -> None:
    w = outlier_rows()
    info = matmul_info(w, mean_weight_size=float(w.size))
    assert Quantize(bits=8).apply(Dense(w), info).group_size == 8
    assert Quantize(bits=8, group_size=64).apply(Dense(w), info).group_size == 64
    assert Quantize(bits=8, granularity="channel").apply(Dense(w), info).granularity == "channel"
    # 4 bits keep their fixed default (groups of 16 with 5-bit codes).
    assert Quantize(bits=4).apply(Dense(w), info).group_size == 16


def test_onnx_output_runs_and_reports_the_group_size_used(tmp_path: Path) -> None:
    src = matmul_model(tmp_path / "m.onnx", {"a": outlier_rows(seed=1),
                                             "b": rng_weights(64, 512, seed=2) * 0.05})
    report = compress(src, tmp_path / "o.onnx", Recipe([Quantize(bits=8)]))
    used = {r.name: r.stages[0]["group_size"] for r in report.rows}
    assert {r.name: r.encoding for r in report.rows} == {
        name: f"int8 g{g} sym s8" for name, g in used.items()}
    assert used["a"] < former_group(512)
    applied = report.applied["stages"][0]["group_size"]
    assert applied == used if len(set(used.values())) > 1 else applied == used["a"]
    x = np.random.default_rng(5).standard_normal((8, 512)).astype(np.float32)
    before, after = ort_run(src, {"x": x})[0], ort_run(tmp_path / "o.onnx", {"x": x})[0]
    assert compare(before, after).rel_l2 < 0.01
    # Back from the file: the layout the report names.
    assert open_model(tmp_path / "o.onnx").encodings["a"]["group_size"] == used["a"]


def test_cli_group_size_wins_and_output_is_deterministic(tmp_path: Path) -> None:
    src = matmul_model(tmp_path / "m.onnx", {"a": outlier_rows(seed=1)})
    outs = []
    for i, extra in enumerate(([], [], ["--group-size", "64"])):
        out = tmp_path / f"o{i}.onnx"
        result = run_cli(["compress", src, "-o", out, "--report", tmp_path / f"r{i}.json",
                          "--quiet", "quantize", "--bits", "8", *extra])
        assert result.exit_code == 0, result.output
        outs.append(out)
        rows = json.loads((tmp_path / f"r{i}.json").read_text())["tensors"]
        assert rows[0]["stages"][0]["group_size"] == (64 if extra else 16)
    assert sha256(outs[0]) == sha256(outs[1]) != sha256(outs[2])


def test_dry_run_says_int8_group_sizes_are_estimated(tmp_path: Path) -> None:
    src = matmul_model(tmp_path / "m.onnx", {"a": outlier_rows(seed=1)})
    guess = estimate(open_model(src), Recipe([Quantize(bits=8)]))
    assert guess.from_values == ["quantize"]
    assert estimate(open_model(src), Recipe([Quantize(bits=8, group_size=32)])).from_values == []
    [row] = dry_run(plan_batch([src], tmp_path / "out"), Recipe([Quantize(bits=8)]))
    assert "quantize chooses int8 group sizes from the weights (estimated" in row.note
