"""One BLAS thread for numerics whose rounding depends on the thread count.

LAPACK's blocked factorizations and OpenBLAS's threaded products (X^T X
among them) sum in an order that depends on how many threads share the
work, so their results, and the files written from them, would differ
between machines and between OPENBLAS_NUM_THREADS settings (a 2048 x 2048
SVD with --energy gave different files at 1 and 2 threads; X^T X of 3000
rows of 512 inputs differed in its last bits). Such work runs
here on one BLAS thread. The limit is process-wide (threadpoolctl), so
overlapping users from several pipeline threads share it: it is set by the
first to enter and restored by the last to leave.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Any, Iterator

_lock = threading.Lock()
_users = 0
_limits: Any = None


@contextmanager
def one_blas_thread() -> Iterator[None]:
    """Run the block on one BLAS thread (reentrant, shared between threads)."""
    global _users, _limits
    with _lock:
        if _users == 0:
            from threadpoolctl import threadpool_limits  # lazy: only these numerics need it
            _limits = threadpool_limits(1, user_api="blas")
        _users += 1
    try:
        yield
    finally:
        with _lock:
            _users -= 1
            if _users == 0:
                _limits.restore_original_limits()
                _limits = None
