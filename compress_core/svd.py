"""Truncated SVD: numpy's LAPACK SVD, or a randomized one when the rank is small."""

from __future__ import annotations

import numpy as np

from modelpress.core.blas import one_blas_thread

# Randomized SVD settings (Halko, Martinsson & Tropp 2011): extra sampled
# directions and power iterations make the subspace accurate for the slowly
# decaying spectra of trained weights; the seed keeps outputs byte-identical.
OVERSAMPLE = 10
POWER_ITERATIONS = 4
SEED = 0
# Use the randomized method when rank + oversample is at most this fraction of
# min(rows, cols); beyond it the full SVD costs about the same and is exact.
RANDOMIZED_UP_TO = 0.25


def truncated_svd(a: np.ndarray, rank: int, method: str = "auto",
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The `rank` leading singular triplets (u [m, r], s [r], vt [r, n]) of a 2-D array.

    method: "full" (numpy), "randomized", or "auto" (randomized when the rank
    is small against the matrix). Signs are normalised so the largest entry
    of each left singular vector is positive, which makes outputs repeatable.
    """
    a = np.asarray(a)
    small = min(a.shape)
    rank = max(1, min(rank, small))
    if method == "auto":
        method = "randomized" if rank + OVERSAMPLE <= RANDOMIZED_UP_TO * small else "full"
    if method == "randomized":
        u, s, vt = _randomized(a, rank)
    else:
        with one_blas_thread():
            u, s, vt = np.linalg.svd(a, full_matrices=False)
        u, s, vt = u[:, :rank], s[:rank], vt[:rank]
    return _fix_signs(u, s, vt)


def singular_values(a: np.ndarray) -> np.ndarray:
    """All singular values, largest first."""
    with one_blas_thread():
        return np.linalg.svd(np.asarray(a), compute_uv=False)


def rank_for_energy(s: np.ndarray, energy: float) -> int:
    """Smallest rank whose squared singular values hold `energy` of the total."""
    power = np.square(s.astype(np.float64))
    total = power.sum()
    if total == 0:
        return 1
    kept = np.cumsum(power) / total
    # A tiny tolerance so energy=1.0 does not demand the last rounding error.
    return int(min(np.searchsorted(kept, energy - 1e-12) + 1, s.size))


def _randomized(a: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    # One BLAS thread: the thin QR steps and medium products gain little from
    # threads and lose badly when the CPUs are shared (OpenBLAS threads wait
    # for each other): 4096x4096 at rank 256 took 12-36 s threaded on a loaded
    # 2-CPU machine and 1.6 s on one thread. Tensors run in parallel already
    # (--threads).
    with one_blas_thread():
        return _randomized_steps(a, rank)


def _randomized_steps(a: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(SEED)
    transpose = a.shape[0] < a.shape[1]
    if transpose:  # sample the longer side: fewer flops in the QR steps
        a = a.T
    k = min(rank + OVERSAMPLE, min(a.shape))
    omega = rng.standard_normal((a.shape[1], k)).astype(a.dtype)
    q, _ = np.linalg.qr(a @ omega)
    for _ in range(POWER_ITERATIONS):
        z, _ = np.linalg.qr(a.T @ q)
        q, _ = np.linalg.qr(a @ z)
    ub, s, vt = np.linalg.svd(q.T @ a, full_matrices=False)
    u = q @ ub
    u, s, vt = u[:, :rank], s[:rank], vt[:rank]
    if transpose:
        return vt.T, s, u.T
    return u, s, vt


def _fix_signs(u: np.ndarray, s: np.ndarray,
               vt: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pivot = np.abs(u).argmax(axis=0)
    signs = np.sign(u[pivot, np.arange(u.shape[1])])
    signs[signs == 0] = 1
    return u * signs, s, vt * signs[:, None]
