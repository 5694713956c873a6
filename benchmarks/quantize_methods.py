"""quantize --method rtn against --method mse: weight error and time, at the same bits and groups.

Quantizes every weight of the sample transformer (both formats: their
weights are the same, laid out [in, out] in ONNX MatMuls and [out, in] in
safetensors) and one 4096 x 4096 matrix with heavy-tailed (Student-t)
weights, at 4 bits per group of 32 and 128 and per channel, and prints a
Markdown table: SQNR of each method, the gain of mse in dB, and the time
ratio mse / rtn in CPU time (best of --repeat; CPU time rather than wall
time, so other processes on the machine do not distort the ratio).

    python benchmarks/quantize_methods.py [--repeat 3] [--size 4096]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from modelpress import Dense, Quantize, TensorInfo, compare  # noqa: E402
from modelpress.formats import open_model  # noqa: E402


def tensors(size: int) -> dict[str, list[tuple[np.ndarray, TensorInfo]]]:
    found = {}
    for fmt in ("onnx", "safetensors"):
        store = open_model(ROOT / "sample_models" / f"transformer.{fmt}")
        found[f"sample transformer ({fmt})"] = [
            (store.read(n), i) for n, i in store.tensors.items() if i.default_target(4096)]
    w = (np.random.default_rng(0).standard_t(5, (size, size)) * 0.02).astype(np.float32)
    found[f"{size}x{size} Student-t(5)"] = [(w, TensorInfo("w", w.shape, w.dtype, True, 0, 1))]
    return found


def run(stage: Quantize, items, repeat: int) -> tuple[float, float]:
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        outs = [stage.apply(Dense(w), info) for w, info in items]
        best = min(best, time.process_time() - start)
    total = None
    for (w, _), out in zip(items, outs):
        stats = compare(w, out.decode())
        total = stats if total is None else total + stats
    return total.sqnr_db, best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--size", type=int, default=4096)
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print()
    print("| weights | 4-bit grain | rtn SQNR dB | mse SQNR dB | mse gain dB | CPU time mse / rtn |")
    print("|---|---|---:|---:|---:|---:|")
    for label, items in tensors(args.size).items():
        for grain in ({"group_size": 32}, {"group_size": 128}, {"granularity": "channel"}):
            rtn = run(Quantize(bits=4, method="rtn", **grain), items, args.repeat)
            mse = run(Quantize(bits=4, method="mse", **grain), items, args.repeat)
            name = f"group {grain['group_size']}" if "group_size" in grain else "channel"
            print(f"| {label} | {name} | {rtn[0]:.2f} | {mse[0]:.2f} | {mse[0] - rtn[0]:+.2f} "
                  f"| {mse[1] / rtn[1]:.1f}x |")
    print()
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
