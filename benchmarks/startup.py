"""Whole-process start-up of `modelpress --help` and `--version`, side by side with `import numpy`.

    python benchmarks/startup.py              # 15 rounds
    python benchmarks/startup.py --runs 31    # more rounds on a noisy machine

Issue 14's bar: `modelpress --help` and `modelpress --version` each take at most
0.3 s whole-process (spawn to exit), median of several runs. Each round runs every
command once, in turn, so a busy spell on a shared machine slows all of them
alike; `python -c "import numpy"` in the same rounds is the baseline that says
how fast this machine starts Python at all (numpy is the least a run imports).
The console script is the one next to this Python (`pip install -e .` puts it
there); `--python` picks another interpreter and its script.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

TARGET_S = 0.3


def commands(python: Path) -> dict[str, list[str]]:
    """Label -> argv of each process timed; the baseline first."""
    script = python.parent / "modelpress"
    modelpress = [str(script)] if script.exists() else [str(python), "-m", "modelpress"]
    return {
        'python -c "import numpy"': [str(python), "-c", "import numpy"],
        "modelpress --help": [*modelpress, "--help"],
        "modelpress --version": [*modelpress, "--version"],
    }


def time_once(argv: list[str]) -> float:
    """Seconds from spawn to exit; a failing command stops the benchmark."""
    start = time.perf_counter()
    done = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - start
    if done.returncode:
        sys.exit(f"{' '.join(argv)} exited with {done.returncode}:\n{done.stderr.decode(errors='replace')}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15, help="rounds; each runs every command once")
    parser.add_argument("--python", type=Path, default=Path(sys.executable),
                        help="interpreter whose modelpress is timed (default: this one)")
    args = parser.parse_args()
    if args.runs < 1:
        parser.error("--runs must be at least 1")
    python = Path(shutil.which(str(args.python)) or args.python)
    timed = commands(python)
    # A first, untimed round warms the file cache and writes any missing .pyc files.
    for argv in timed.values():
        time_once(argv)
    times: dict[str, list[float]] = {label: [] for label in timed}
    for _ in range(args.runs):
        for label, argv in timed.items():
            times[label].append(time_once(argv))

    baseline = statistics.median(times['python -c "import numpy"'])
    print(f"{args.runs} interleaved runs each, whole process (spawn to exit); "
          f"{os.cpu_count()} CPUs; {python}")
    print()
    print(f"| command | median | min - max | IQR | vs numpy | target {TARGET_S} s |")
    print("|---|---:|---:|---:|---:|---|")
    for label, samples in times.items():
        median = statistics.median(samples)
        quartiles = statistics.quantiles(samples, n=4) if len(samples) > 1 else [median] * 3
        verdict = "" if label.startswith("python") else ("PASS" if median <= TARGET_S else "FAIL")
        print(f"| `{label}` | {median:.3f} s | {min(samples):.3f} - {max(samples):.3f} s "
              f"| {quartiles[2] - quartiles[0]:.3f} s | {median / baseline:.2f}x | {verdict} |")


if __name__ == "__main__":
    main()
