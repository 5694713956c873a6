"""Time of `cluster` (1-D k-means) on a large tensor, per tensor and per channel.

Clusters a 4096 x 4096 float32 tensor (16.8M weights, Gaussian with a few
heavy-tailed rows) with the `cluster` stage at the given bit widths and
prints a Markdown table: wall and CPU seconds (best of --repeat; CPU time is
not distorted by other processes), weights per CPU second, the
weight SQNR, the largest number of distinct values per codebook, and the
CPU time of one plain `np.sort` of the same data for scale (the k-means sorts
once, then runs its Lloyd steps on the sorted array). It also checks that two
runs give byte-identical codebooks and indices.

    python benchmarks/cluster_speed.py [--rows 4096] [--cols 4096] [--bits 4] [--repeat 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from modelpress import Cluster, Dense, TensorInfo, compare  # noqa: E402


def weights(rows: int, cols: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(0.02)
    w[:: max(rows // 16, 1)] *= np.float32(8.0)  # a few rows with a wider range
    return w


def timed(fn, repeat: int) -> tuple[float, float, object]:
    """Best wall time, best CPU time, and the result."""
    wall, cpu, result = float("inf"), float("inf"), None
    for _ in range(repeat):
        start, start_cpu = time.perf_counter(), time.process_time()
        result = fn()
        wall = min(wall, time.perf_counter() - start)
        cpu = min(cpu, time.process_time() - start_cpu)
    return wall, cpu, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096)
    parser.add_argument("--cols", type=int, default=4096)
    parser.add_argument("--bits", type=int, nargs="+", default=[4])
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    w = weights(args.rows, args.cols)
    info = TensorInfo("w", w.shape, w.dtype, True, 0, 1)
    _, sort_time, _ = timed(lambda: np.sort(w, axis=None), args.repeat)
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print()
    print(f"| tensor | stage | wall s | CPU s | weights per CPU s | CPU vs one np.sort "
          f"({sort_time:.2f} s) | SQNR dB | max distinct per codebook | deterministic |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for bits in args.bits:
        for per_channel in (False, True):
            stage = Cluster(bits=bits, per_channel=per_channel)
            wall, seconds, out = timed(lambda: stage.apply(Dense(w), info), args.repeat)
            again = stage.apply(Dense(w), info)
            same = (out.lut.tobytes() == again.lut.tobytes()
                    and out.indices.tobytes() == again.indices.tobytes())
            decoded = out.decode()
            rows = decoded.reshape(out.lut.shape[0], -1)
            distinct = max(len(np.unique(r)) for r in rows[:64])
            label = f"cluster --bits {bits}" + (" --per-channel" if per_channel else "")
            print(f"| {args.rows}x{args.cols} fp32 ({w.size / 1e6:.1f}M) | {label} | {wall:.2f} "
                  f"| {seconds:.2f} "
                  f"| {w.size / seconds / 1e6:.1f}M | {seconds / sort_time:.1f}x "
                  f"| {compare(w, decoded).sqnr_db:.2f} | {distinct} | {'yes' if same else 'NO'} |")
    print()
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
