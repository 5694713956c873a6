"""Interrupt the modelpress CLI while it writes an output, and report what is left behind.

Shared by tests/test_atomic_writes.py (a ~64 MB model) and
benchmarks/kill_during_write.py (the full 500 MB case). The CLI runs as a
real subprocess (`python -m modelpress`); the parent polls the output folder and
sends the signal as soon as the temporary output file exists, so the signal
lands after the writer started and before the rename that publishes the file.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
TENSOR_MB = 4


def make_safetensors(path: Path, megabytes: int, seed: int = 0) -> Path:
    """A safetensors file of about `megabytes` MB: 4 MB float32 [1024, 1024] tensors, streamed."""
    from modelpress.formats.safetensors.header import encode_header
    count = max(1, megabytes // TENSOR_MB)
    shape = (1024, 1024)
    nbytes = 4 * shape[0] * shape[1]
    header = encode_header([(f"layers.{i}.weight", "F32", shape, nbytes) for i in range(count)],
                           {"format": "pt"})
    rng = np.random.default_rng(seed)
    with open(path, "wb") as out:
        out.write(header)
        for _ in range(count):
            out.write(rng.standard_normal(shape, dtype=np.float32).tobytes())
    return path


def temp_files(folder: Path, name: str) -> list[Path]:
    """modelpress temporary files for output `name` in `folder`."""
    return [folder / f for f in os.listdir(folder)
            if f.startswith(f".{name}.") and f.endswith(".modelpress-tmp")]


@dataclass
class Outcome:
    """What an interrupted run left: exit status, stderr and the files at the output."""

    returncode: int
    stderr: str
    signalled: bool  # the signal was sent while a temporary output file existed
    temp_size_at_signal: int
    temps_after: list[Path]
    output_exists: bool
    seconds_to_signal: float


def cli_command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "modelpress", *[str(a) for a in args]]


def run_interrupted(args: list[str], output: Path, sig: int, timeout: float = 300.0,
                    min_temp_bytes: int = 1) -> Outcome:
    """Run the CLI and send `sig` once the output's temp file holds `min_temp_bytes` bytes."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    start = time.monotonic()
    proc = subprocess.Popen(cli_command(args), cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    signalled, size = False, 0
    try:
        while proc.poll() is None and time.monotonic() - start < timeout:
            temps = temp_files(output.parent, output.name)
            if temps:
                try:
                    size = temps[0].stat().st_size
                except FileNotFoundError:
                    continue
                if size >= min_temp_bytes:
                    proc.send_signal(sig)
                    signalled = True
                    break
            time.sleep(0.0005)
        elapsed = time.monotonic() - start
        _, stderr = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return Outcome(proc.returncode, stderr, signalled, size, temp_files(output.parent, output.name),
                   output.exists(), elapsed)


def run_cli_subprocess(args: list[str], timeout: float = 600.0) -> subprocess.CompletedProcess:
    """Run the CLI to completion in a subprocess."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run(cli_command(args), cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


SIGNALS = {"SIGKILL": signal.SIGKILL, "SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM}
