"""Static int8 activations (issue 19): what each range method does to a model's outputs.

Every float activation feeding a MatMul, Gemm or Conv is quantized to uint8 and back
(QuantizeLinear -> DequantizeLinear, weights left in float), with ranges calibrated on a
model's calibration inputs by each method of modelpress.core.activation_ranges, then the
outputs are compared with the float model's on its evaluation inputs (never the same
samples). Rows: each method for every tensor; the per-tensor choice by measured output
error (on the calibration inputs); for models with smoothable MatMuls (SmoothQuant,
alpha 0.5), the same after smoothing. Prints a Markdown table.

    python benchmarks/activation_ranges.py                       # transformer, magika, open_nsfw
    python benchmarks/activation_ranges.py --models transformer --max-runs 60
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from peerbench import models  # noqa: E402

from modelpress.core.activation_ranges import METHODS, ranges  # noqa: E402
from modelpress.core.evaluate import looks_like_class_scores, top1_agreement  # noqa: E402
from modelpress.core.metrics import compare  # noqa: E402
from modelpress.formats.onnx.activation_stats import collect_stats, matmul_inputs  # noqa: E402
from modelpress.formats.onnx.fake_quant import FakeQuantRunner, worst_error  # noqa: E402
from modelpress.formats.onnx.range_choice import choose_with  # noqa: E402
from modelpress.formats.onnx.smooth import sites, smooth  # noqa: E402

NAMES = ["transformer", "magika", "open_nsfw"]


def measure(runner: FakeQuantRunner, reference: dict[str, np.ndarray],
            outputs: dict[str, np.ndarray]) -> tuple:
    """Worst output's relative L2 error, its cosine, top-1 agreement of class scores, and
    the worst relative error of the logits before a final softmax."""
    worst, cosine, top1 = 0.0, 1.0, None
    logits = worst_error(reference, outputs, list(dict.fromkeys(runner.signals.values())))
    for name in runner.signals:
        ref = reference[name]
        if ref.dtype.kind != "f":
            continue
        stats = compare(ref, outputs[name])
        worst, cosine = max(worst, stats.rel_l2), min(cosine, stats.cosine)
        if looks_like_class_scores(name, ref) or ref.ndim >= 2:
            agreement = top1_agreement(ref, outputs[name])
            if agreement is not None:
                top1 = agreement if top1 is None else min(top1, agreement)
    return worst, cosine, top1, logits


def rows_for(label: str, path: Path, model: onnx.ModelProto, calibration: Path,
             cal_feeds: dict, eval_feeds: dict, max_runs: int) -> list[tuple]:
    names = matmul_inputs(model)
    t0 = time.perf_counter()
    hists = collect_stats(path, model, calibration, names).histograms
    candidates = {n: ranges(h) for n, h in hists.items()}
    seconds = time.perf_counter() - t0
    evaluate = FakeQuantRunner(path, model, names, eval_feeds)
    reference = evaluate.outputs({})
    rows = []
    for method in METHODS:
        got = evaluate.outputs({n: c[method] for n, c in candidates.items()})
        rows.append((label, method, len(names), *measure(evaluate, reference, got), ""))
    on_cal = FakeQuantRunner(path, model, names, cal_feeds, calibration=calibration)
    t1 = time.perf_counter()
    choice = choose_with(on_cal, candidates, on_cal.outputs({}), max_runs)
    chose = time.perf_counter() - t1
    picked = {m: sum(g.method == m for g in choice.chosen.values()) for m in METHODS}
    note = (f"{choice.runs} runs, {chose:.0f} s; " + ", ".join(
        f"{m} {k}" for m, k in picked.items() if k) + f"; ranges {seconds:.1f} s")
    got = evaluate.outputs(choice.chosen)
    rows.append((label, "per-tensor choice", len(names), *measure(evaluate, reference, got), note))
    return rows


def run_model(case, workdir: Path, max_runs: int) -> list[tuple]:
    path = Path(case.onnx)
    model = onnx.load(str(path))
    cal_feeds, eval_feeds = case.calibration(), case.inputs()
    calibration = workdir / f"{case.name}-calibration.npz"
    np.savez(calibration, **cal_feeds)
    rows = rows_for(case.name, path, model, calibration, cal_feeds, eval_feeds, max_runs)
    found, _ = sites(model)
    if found:
        stats = collect_stats(path, model, calibration, [],
                              channels=[s.activation for s in found])
        smoothed, notes = smooth(model, stats.absmax, alpha=0.5)
        smoothed_path = workdir / f"{case.name}-smoothed.onnx"
        onnx.save(smoothed, str(smoothed_path))
        label = f"{case.name} smoothed ({len(found)} inputs)"
        rows += [(label, *row[1:]) for row in rows_for(
            label, smoothed_path, smoothed, calibration, cal_feeds, eval_feeds, max_runs)]
    return rows


def table(rows: list[tuple]) -> str:
    lines = ["| model | ranges | activations | output rel. error | cosine | top-1 "
             "| logits rel. error | notes |", "|---|---|---|---|---|---|---|---|"]
    for model, method, count, error, cosine, top1, logits, note in rows:
        lines.append(f"| {model} | {method} | {count} | {error:.4f} | {cosine:.5f} | "
                     f"{'-' if top1 is None else f'{top1:.3f}'} | {logits:.4f} | {note} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=NAMES, choices=NAMES)
    parser.add_argument("--max-runs", type=int, default=200,
                        help="model runs the per-tensor choice may take (default 200)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        suite = models.suite(False, Path(tmp), args.models)
        rows = []
        for case in suite.cases:
            rows += run_model(case, Path(tmp), args.max_runs)
            print(f"{case.name} done", file=sys.stderr)
        print(table(rows))
        for skipped in suite.skipped:
            print(f"\nskipped {skipped.name}: {skipped.reason}")


if __name__ == "__main__":
    main()
