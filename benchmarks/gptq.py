"""quantize --method gptq against --method rtn: output error, bytes and time, same layout.

    python benchmarks/gptq.py                          # transformer, magika, open_nsfw; 4 and 8 bits
    python benchmarks/gptq.py --models magika --bits 4
    python benchmarks/gptq.py --calibration-samples 64 # magika/open_nsfw: more calibration samples
    python benchmarks/gptq.py --models synthetic --quick  # the 2.6M-parameter synthetic transformer

Each model is compressed at the default layout for the bits given, once with
`--method rtn` and once with `--method gptq --calibration`, and both outputs are
run in onnxruntime on the evaluation inputs of benchmarks/peerbench/models.py;
the calibration inputs are that file's too (same source, other samples; with
--calibration-samples, magika's and open_nsfw's functions are called for that
many samples with the same seeds). "output error" is the tool's own metric
(`compress --inputs`: the worst output's relative L2 error). mse is the
default without calibration, shown for reference. "floor" is the output error
of quantizing, with the plain method, only the tensors GPTQ cannot improve, as
a share of rtn's: those it does not round (Gather embeddings the probe budget
left out) and those whose inputs never mix and whose outputs were not probed
(one-hot inputs: X^T X is diagonal, so no error is fed back and GPTQ keeps the
nearest codes); nan when there are none. "probed" counts the tensors rounded
under their probed output moments too (modelpress/formats/onnx/probe.py). Times
are wall time of the compress call (calibration run included), on this
machine as loaded; read the ratio.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.peerbench import models  # noqa: E402
from modelpress import Quantize, Recipe, compress  # noqa: E402
from modelpress.app.evaluation import Baseline, EvalSettings  # noqa: E402
from modelpress.formats import open_model  # noqa: E402

# The bars: gptq's output error at most this share of rtn's, at the same bytes.
TARGETS = {(4, "transformer"): 0.6, (4, "magika"): 0.75, (4, "open_nsfw"): 0.75,
           (8, "transformer"): 0.7, (8, "magika"): 0.7, (8, "open_nsfw"): 0.7}


def _calibration(case: models.ModelCase, samples: int | None) -> dict[str, np.ndarray]:
    if samples and case.name == "magika":
        return models.magika_inputs(samples=samples, seed=13)
    if samples and case.name == "open_nsfw":
        return models.image_inputs(samples=samples, seed=14)
    return case.calibration()


def _run(src: Path, dst: Path, baseline: Baseline, recipe: Recipe,
         calibration: Path | None) -> tuple[float, int, float, object]:
    start = time.perf_counter()
    report = compress(src, dst, recipe,
                      calibration=None if calibration is None else str(calibration))
    seconds = time.perf_counter() - start
    return baseline.evaluate(dst).output_error, dst.stat().st_size, seconds, report


def _diagonal(src: Path, calibration: Path, names: set[str]) -> tuple[str, ...]:
    """The weights among `names` whose input moments X^T X are diagonal."""
    store = open_model(src)
    store.calibrate(calibration, names)
    found = []
    for name in sorted(names):
        stats = store.tensors[name].input_stats
        if stats is None or stats.second_moments is None:
            continue
        h = np.abs(stats.second_moments.load()).astype(np.float64)
        diagonal = np.diagonal(h, axis1=-2, axis2=-1).sum()
        if h.sum() - diagonal <= 1e-9 * diagonal:
            found.append(name)
    return tuple(found)


def _probed(notes: list[str]) -> int:
    """How many tensors the report's notes say were probed."""
    for note in notes:
        found = re.match(r"--calibration: output-side moments probed for (\d+) tensors", note)
        if found:
            return int(found.group(1))
    return 0


def measure(case: models.ModelCase, bits: int, work: Path, samples: int | None) -> str:
    np.savez(work / "eval.npz", **case.inputs())
    np.savez(work / "cal.npz", **_calibration(case, samples))
    baseline = Baseline.prepare(case.onnx, EvalSettings(inputs=work / "eval.npz"))
    out = work / "out.onnx"
    rtn = _run(case.onnx, out, baseline, Recipe([Quantize(bits=bits, method="rtn")]), None)
    mse = _run(case.onnx, out, baseline, Recipe([Quantize(bits=bits, method="mse")]), None)
    gptq = _run(case.onnx, out, baseline, Recipe([Quantize(bits=bits, method="gptq")]),
                work / "cal.npz")
    others = tuple(row.name for row in gptq[3].rows if row.stages[0]["method"] != "gptq")
    probed = _probed(gptq[3].notes)
    fixed = others + _diagonal(case.onnx, work / "cal.npz", {r.name for r in gptq[3].rows}
                               ) if not probed else others
    floor = float("nan")
    if fixed:
        floor = _run(case.onnx, out, baseline,
                     Recipe([Quantize(bits=bits, include=fixed)]), None)[0] / rtn[0]
    ratio = gptq[0] / rtn[0]
    target = TARGETS.get((bits, case.name))
    verdict = "" if target is None else ("PASS" if ratio <= target and gptq[1] == rtn[1]
                                         else "FAIL") + f" (<= {target})"
    rounded = len(gptq[3].rows) - len(others)
    return (f"| {case.name} | {bits} | {rtn[0]:.5f} | {mse[0]:.5f} | {gptq[0]:.5f} | "
            f"{ratio:.3f} | {verdict} | {floor:.3f} | {rounded}/{len(gptq[3].rows)} | "
            f"{probed} | "
            f"{rtn[1]:,} | {gptq[1]:,} | {rtn[2]:.2f} s | {gptq[2]:.2f} s | "
            f"{gptq[2] / rtn[2]:.1f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["transformer", "magika", "open_nsfw"])
    parser.add_argument("--bits", nargs="+", type=int, default=[4, 8])
    parser.add_argument("--quick", action="store_true",
                        help="synthetic: the 2.6M-parameter transformer, not the 55M one")
    parser.add_argument("--calibration-samples", type=int, default=None,
                        help="magika/open_nsfw: calibration samples (default: models.py's)")
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory() as tmp:
        suite = models.suite(args.quick, Path(tmp), args.models)
        for skipped in suite.skipped:
            print(f"skipped {skipped.name}: {skipped.reason}")
        print()
        print("| model | bits | rtn err | mse err | gptq err | gptq/rtn | bar | floor/rtn "
              "| gptq tensors | probed | rtn bytes | gptq bytes | rtn time | gptq time | "
              "time ratio |")
        print("|---|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        for case in suite.cases:
            for bits in args.bits:
                print(measure(case, bits, Path(tmp), args.calibration_samples), flush=True)
        print()
        for case in suite.cases:
            note = case.calibration_note
            if args.calibration_samples and case.name in ("magika", "open_nsfw"):
                note = f"{args.calibration_samples} samples of models.py's function and seed"
            print(f"- {case.name}: evaluation: {case.inputs_note}; calibration: {note}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
