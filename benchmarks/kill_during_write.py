"""Interrupt `modelpress compress` while it writes a large output; check what is left.

    python benchmarks/kill_during_write.py            # a 500 MB model and output
    python benchmarks/kill_during_write.py --mb 2000 --at 0.9

A safetensors model of --mb megabytes (float32 [1024, 1024] tensors) is
compressed with one tensor quantized and the rest copied, so the output is
about as large as the input. For each signal the CLI runs in a subprocess and
gets the signal once its temporary output holds --at of the final size.
Expected: SIGKILL leaves no file at the output name (or the previous output
intact) and an orphaned `.*.modelpress-tmp` (nothing can run on SIGKILL);
SIGINT and SIGTERM leave nothing and exit 1 and 143; the input never changes;
a rerun succeeds. Prints a table; exits 1 if any check fails.
"""

from __future__ import annotations

import argparse
import hashlib
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1] / "tests"),
                str(Path(__file__).resolve().parents[1])]

from interrupt import (make_safetensors, run_cli_subprocess, run_interrupted,  # noqa: E402
                       temp_files)


def digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=500, help="model size in MB (default 500)")
    parser.add_argument("--at", type=float, default=0.5,
                        help="signal when the temp file holds this fraction of the output")
    parser.add_argument("--dir", type=Path, help="work folder (default: a new temp folder)")
    args = parser.parse_args()
    work = args.dir or Path(tempfile.mkdtemp(prefix="modelpress-kill-"))
    work.mkdir(parents=True, exist_ok=True)
    src, out = work / "model.safetensors", work / "out.safetensors"

    start = time.monotonic()
    make_safetensors(src, args.mb)
    print(f"model: {src} ({src.stat().st_size / 1e6:.0f} MB, {time.monotonic() - start:.1f} s "
          "to generate)")
    before = digest(src)
    command = ["compress", src, "-o", out, "-q", "quantize", "--bits", "8", "--include",
               "layers.0.weight"]
    start = time.monotonic()
    done = run_cli_subprocess(command)
    full = time.monotonic() - start
    if done.returncode != 0:
        print(done.stderr)
        return 1
    size = out.stat().st_size
    print(f"uninterrupted run: {full:.1f} s, output {size / 1e6:.0f} MB\n")
    out.unlink()

    rows, ok = [], True
    cases = [("SIGKILL", signal.SIGKILL, False), ("SIGKILL, old output", signal.SIGKILL, True),
             ("SIGINT", signal.SIGINT, False), ("SIGTERM", signal.SIGTERM, False)]
    for label, sig, old in cases:
        for stale in temp_files(work, out.name):
            stale.unlink()
        if old:
            out.write_bytes(b"previous output")
        outcome = run_interrupted(command, out, sig, min_temp_bytes=int(size * args.at))
        intact = digest(src) == before
        if old:
            at_output = "old file intact" if out.read_bytes() == b"previous output" else "CHANGED"
            good_output = at_output == "old file intact"
        else:
            at_output = "a file (!)" if outcome.output_exists else "nothing"
            good_output = not outcome.output_exists
        expected_code = {signal.SIGKILL: -signal.SIGKILL, signal.SIGINT: 1,
                         signal.SIGTERM: 128 + signal.SIGTERM}[sig]
        temps_ok = (len(outcome.temps_after) == 1) if sig == signal.SIGKILL else not outcome.temps_after
        passed = (outcome.signalled and good_output and intact and temps_ok
                  and outcome.returncode == expected_code and "Traceback" not in outcome.stderr)
        ok &= passed
        rows.append((label, f"{outcome.seconds_to_signal:.1f}", f"{outcome.temp_size_at_signal / 1e6:.0f}",
                     str(outcome.returncode), str(len(outcome.temps_after)), at_output,
                     "yes" if intact else "NO", "ok" if passed else "FAIL"))
        if out.exists():
            out.unlink()

    rerun = run_cli_subprocess(command)
    rerun_ok = rerun.returncode == 0 and out.stat().st_size == size
    ok &= rerun_ok
    header = ("signal", "s to signal", "temp MB", "exit", "temps left", "at output",
              "input same", "check")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    for row in [header] + rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)))
    print(f"\nrerun after the interruptions: {'ok' if rerun_ok else 'FAILED'} (the temp file "
          "each SIGKILL orphans is deleted before the next case)")
    print(f"work folder: {work}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
