"""Error metrics on known values."""

from __future__ import annotations

import math

import numpy as np

from modelpress import compare


def test_metrics_on_known_vectors() -> None:
    ref = np.array([3.0, 4.0], np.float32)
    approx = np.array([3.0, 5.0], np.float32)
    stats = compare(ref, approx)
    assert stats.rel_l2 == 1 / 5
    assert math.isclose(stats.sqnr_db, 10 * math.log10(25))
    assert stats.max_abs == 1.0
    assert math.isclose(stats.cosine, 29 / (5 * math.sqrt(34)))


def test_metrics_add_over_tensors() -> None:
    a = compare(np.array([1.0, 0.0]), np.array([1.0, 1.0]))
    b = compare(np.array([0.0, 2.0]), np.array([0.0, 2.0]))
    total = a + b
    assert total.rel_l2 == math.sqrt(1 / 5)
    assert total.max_abs == 1.0 and total.count == 4


def test_exact_reconstruction() -> None:
    x = np.arange(6, dtype=np.float32)
    stats = compare(x, x)
    assert stats.rel_l2 == 0.0 and stats.sqnr_db == math.inf and stats.cosine == 1.0
    assert stats.as_dict()["sqnr_db"] is None  # JSON has no infinity
