"""Run a module as `python -m MODULE ARGS...` would, then record the process's peak RSS.

    python -m benchmarks.peerbench.launch MODULE ARGS...

The peak (VmHWM of /proc/self/status, read at exit) is written to the file named by the
environment variable MODELPRESS_BENCH_HWM. The process has to report it itself: on Linux a
child's getrusage ru_maxrss starts from the RSS of the parent it was forked from (the benchmark,
which holds models in memory), so the parent cannot measure a small child's peak that way.
Only the standard library is imported here, so the measured process is the tool's.
"""

from __future__ import annotations

import atexit
import os
import runpy
import sys

HWM_ENV = "MODELPRESS_BENCH_HWM"


def _record_peak() -> None:
    path = os.environ.get(HWM_ENV)
    if not path:
        return
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    with open(path, "w", encoding="ascii") as out:
                        out.write(str(int(line.split()[1]) * 1024))
                    return
    except OSError:
        pass  # no /proc: the parent falls back to getrusage


def main() -> None:
    """Run sys.argv[1] as the main module with the remaining arguments."""
    module = sys.argv[1]
    sys.argv = [module] + sys.argv[2:]
    atexit.register(_record_peak)
    runpy.run_module(module, run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
