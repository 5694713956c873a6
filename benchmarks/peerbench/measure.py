"""Whole-process wall time and peak RSS of one command, run in a fresh process."""

from __future__ import annotations

import os
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path


HWM_ENV = "MODELPRESS_BENCH_HWM"  # same name as in launch.py (which imports nothing of ours)


@dataclass
class ProcessRun:
    """What one timed process did: wall seconds, peak RSS in bytes (None if the process did not
    report it), exit code, and the line of its stderr that names the error (empty on success)."""

    seconds: float
    peak_rss: int | None
    returncode: int
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def run_timed(cmd: list[str], cwd: str | Path, timeout: float = 3600.0) -> ProcessRun:
    """Run `cmd` (a `python -m benchmarks.peerbench.launch ...` command) and measure it: wall
    time from spawn to exit, interpreter start and imports included, and the peak RSS the
    process reports at exit (VmHWM; see launch.py for why getrusage cannot be used)."""
    with tempfile.TemporaryDirectory() as tmp:
        hwm = Path(tmp) / "hwm"
        env = dict(os.environ, **{HWM_ENV: str(hwm)})
        with open(Path(tmp) / "stdout", "wb") as out, open(Path(tmp) / "stderr", "w+b") as err:
            start = time.perf_counter()
            proc = subprocess.Popen(cmd, cwd=cwd, stdout=out, stderr=err, env=env)
            timer = threading.Timer(timeout, proc.kill)
            timer.start()
            try:
                code = proc.wait()
            finally:
                timer.cancel()
            seconds = time.perf_counter() - start
            err.seek(0)
            text = err.read().decode("utf-8", "replace")
        peak = int(hwm.read_text()) if hwm.exists() else None
    error = "" if code == 0 else error_line(text, code, timed_out=seconds >= timeout)
    return ProcessRun(seconds, peak, code, error)


def error_line(stderr: str, code: int, timed_out: bool = False) -> str:
    """The line of a failed process's stderr that says what went wrong: the exception line of a
    Python traceback ("KeyError: ..."), or modelpress's "Error: ..." line, else the last line."""
    if timed_out:
        return "timed out"
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    if code < 0:
        return f"killed by signal {-code}" + (f" ({lines[-1][:150]})" if lines else "")
    for line in reversed(lines):
        head = line.split(":", 1)[0]
        if line.startswith("Error:") or (head.endswith(("Error", "Exception", "Fail"))
                                         and " " not in head):
            return line[:200]
    return lines[-1][:200] if lines else f"exit code {code}"
