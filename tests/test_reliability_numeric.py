"""Issue 15, item 13: weights near float32's limit (3e38).

lowrank gave numpy overflow warnings, then LinAlgError; every error was NaN;
sweep marked a NaN row as on the Pareto front.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest

from modelpress import Recipe, compress
from modelpress.app.sweep import DEFAULT_SETTINGS, sweep
from modelpress.core.lowrank import Factorize as LowRankStage
from modelpress.core.metrics import compare
from modelpress.core.pipeline import Options

from conftest import write_safetensors


@pytest.fixture
def huge(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    return write_safetensors(tmp_path / "big.safetensors", {
        "w": (rng.uniform(-1, 1, (128, 128)) * 3e38).astype(np.float32),
        "b": rng.standard_normal((128, 128)).astype(np.float32)})


@pytest.mark.parametrize("options", [{"rank_ratio": 0.1}, {"rank_ratio": 0.25},
                                     {"energy": 0.9}, {"rank": 8}])
def test_lowrank_of_huge_weights(tmp_path: Path, huge: Path, options: dict) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = compress(huge, tmp_path / "o.safetensors", Recipe([LowRankStage(**options)]))
    for row in report.rows:
        assert not math.isnan(row.error.rel_l2), row


@pytest.mark.parametrize("rank", [8, 48])  # randomized and full SVD
def test_lowrank_factors_of_huge_weights_scale_exactly(tmp_path: Path, rank: int) -> None:
    """Weights 2^126 times larger give factors exactly 2^63 times larger: scaling by powers
    of two is exact, so taming large values changes nothing but the range."""
    from modelpress.formats import open_model
    small = np.random.default_rng(1).uniform(-1, 1, (128, 128)).astype(np.float32)
    factors = {}
    for name, w in (("small", small), ("huge", small * np.float32(2.0**126))):
        src = write_safetensors(tmp_path / f"{name}.safetensors", {"w": w})
        compress(src, tmp_path / f"{name}-o.safetensors", Recipe([LowRankStage(rank=rank)]))
        encoded = next(enc for n, _, enc, _ in
                       open_model(tmp_path / f"{name}-o.safetensors").logical_tensors()
                       if n == "w")
        factors[name] = (encoded.left.decode(), encoded.right.decode())
    for small_factor, huge_factor in zip(factors["small"], factors["huge"]):
        assert np.array_equal(small_factor * np.float32(2.0**63), huge_factor)


def test_errors_of_huge_values_are_measured() -> None:
    ref = np.full(1000, 3e38, np.float32)
    approx = -ref
    stats = compare(ref, approx)
    assert stats.rel_l2 == pytest.approx(2.0)
    assert stats.max_abs == pytest.approx(6e38)


def test_sweep_never_puts_an_unmeasured_row_on_the_front(huge: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = sweep(huge, DEFAULT_SETTINGS, Options())
    assert report.ran
    for row in report.ran:
        if row.on_front:
            assert math.isfinite(row.weight_error.rel_l2), row
