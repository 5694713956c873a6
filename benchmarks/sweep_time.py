"""How long `modelpress sweep` takes on each sample model, against its one-minute budget.

    python benchmarks/sweep_time.py            # every sample model, default settings
    python benchmarks/sweep_time.py --repeat 3 # best of three runs each

The issue's bar: a sweep of each sample ONNX model finishes in under a minute
on a 2-core machine. Times are wall-clock, in-process (no interpreter start-up),
with evaluation (onnxruntime) on; the table shows each as a share of 60 s.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from modelpress.app.evaluation import EvalSettings  # noqa: E402
from modelpress.app.sweep import sweep  # noqa: E402

BUDGET_S = 60.0
MODELS = ("mlp.onnx", "cnn.onnx", "transformer.onnx", "mlp.safetensors", "cnn.safetensors",
          "transformer.safetensors")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=1, help="runs per model (best is shown)")
    args = parser.parse_args()
    # The sweep command's own timing settings (cli/sweep.py).
    settings = EvalSettings(max_runs=10, time_budget_s=0.5)
    print(f"CPUs: {os.cpu_count()}")
    print(f"{'model':<26} {'settings ran':>12} {'best time':>10} {'of 60 s':>8}")
    for name in MODELS:
        best, ran = float("inf"), 0
        for _ in range(args.repeat):
            start = time.perf_counter()
            report = sweep(ROOT / "sample_models" / name, evaluation=settings)
            best = min(best, time.perf_counter() - start)
            ran = len(report.ran)
        print(f"{name:<26} {f'{ran}/{len(report.rows)}':>12} {best:>9.2f}s "
              f"{best / BUDGET_S:>8.1%}")


if __name__ == "__main__":
    main()
