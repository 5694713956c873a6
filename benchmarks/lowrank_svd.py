"""Randomized truncated SVD against numpy's full SVD: time ratio and error against the optimum.

For an n x n float32 matrix (default 4096) and a rank (default 256), times

- numpy's LAPACK SVD (`np.linalg.svd(a, full_matrices=False)`, what a plain
  implementation would call), and
- modelpress's randomized SVD (`modelpress.core.svd.truncated_svd`, method
  "randomized": range finder with oversampling and power iterations, fixed seed),

and prints a Markdown table with both times, their ratio, and the relative
Frobenius error of each rank-r approximation next to the optimal one
(sqrt(sum of the dropped squared singular values) / ||A||, from the full SVD).

Two matrices: one whose singular values decay like 1/sqrt(i) (the slow decay
of trained weights) and an i.i.d. Gaussian one (a flat spectrum, the hardest
case for a randomized method). The load average is printed too: other
processes on the machine slow both methods down.

    python benchmarks/lowrank_svd.py [--size 4096] [--rank 256] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modelpress.core.svd import truncated_svd  # noqa: E402


def decaying(n: int, seed: int = 0) -> np.ndarray:
    """An n x n matrix with singular values 1 / sqrt(i), random singular vectors."""
    rng = np.random.default_rng(seed)
    # Products of Householder-free random orthogonal bases are costly at n=4096;
    # a QR of a Gaussian matrix is the standard way and runs once.
    u, _ = np.linalg.qr(rng.standard_normal((n, n)).astype(np.float32))
    v, _ = np.linalg.qr(rng.standard_normal((n, n)).astype(np.float32))
    s = (1.0 / np.sqrt(np.arange(1, n + 1))).astype(np.float32)
    return (u * s) @ v.T


def gaussian(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, n)).astype(np.float32)


def relative_error(a: np.ndarray, u: np.ndarray, s: np.ndarray, vt: np.ndarray) -> float:
    return float(np.linalg.norm(a - (u * s) @ vt) / np.linalg.norm(a))


def best(fn, repeat: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3, help="runs of the randomized SVD (best)")
    args = parser.parse_args()
    n, r = args.size, args.rank
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print()
    print(f"| matrix ({n}x{n} fp32), rank {r} | numpy full SVD s | randomized s | speed-up "
          "| optimal rel. error | full SVD rel. error | randomized rel. error | randomized / optimal |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, make in (("singular values 1/sqrt(i)", decaying), ("Gaussian (flat spectrum)",
                                                                  gaussian)):
        a = make(n)
        full_time, (u, s, vt) = best(lambda: np.linalg.svd(a, full_matrices=False), 1)
        optimal = float(np.sqrt(np.sum(s[r:].astype(np.float64) ** 2)
                                / np.sum(s.astype(np.float64) ** 2)))
        full_error = relative_error(a, u[:, :r], s[:r], vt[:r])
        rand_time, (ru, rs, rvt) = best(lambda: truncated_svd(a, r, method="randomized"),
                                        args.repeat)
        rand_error = relative_error(a, ru, rs, rvt)
        print(f"| {label} | {full_time:.2f} | {rand_time:.2f} | {full_time / rand_time:.1f}x "
              f"| {optimal:.5f} | {full_error:.5f} | {rand_error:.5f} | "
              f"{rand_error / optimal:.4f} |")
    print()
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
