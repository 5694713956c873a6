"""Issue 15, item 15: lowrank outputs must not depend on the BLAS thread count.

LAPACK's blocked SVD rounds differently with each thread count: a 2048x2048
tensor gave different files at OPENBLAS_NUM_THREADS 1 and 2 (and a 768x768
one different factors). The SVD runs on one BLAS thread whatever the caller
allows.
"""

from __future__ import annotations

import numpy as np
from threadpoolctl import threadpool_limits

from modelpress.core.svd import singular_values, truncated_svd


def test_svd_is_the_same_on_any_thread_count() -> None:
    n = 768
    a = (np.random.default_rng(0).standard_normal((n, n)) * np.linspace(1, 0.01, n)
         ).astype(np.float32)
    results = []
    for threads in (1, 2):
        with threadpool_limits(threads, user_api="blas"):
            s = singular_values(a)
            u, _, vt = truncated_svd(a, n // 2, "full")
        results.append((s.tobytes(), u.tobytes(), vt.tobytes()))
    assert results[0] == results[1]
