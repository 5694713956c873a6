"""Default int8 in ONNX: group sizes chosen per tensor from its values against the former K/5 rule.

For each model, in one run: `quantize --bits 8` as it is now (each tensor's
layout chosen by rate and distortion, compress_core/quantize/grouping.py) and
the former default written out as explicit options (one quantize stage per
group size of the rule max(16, K/5) rounded up to a power of two, at most 128
(`grouping.former_group`), its --include naming the tensors that rule gave
that size: the layout the former default wrote, byte for byte). Both outputs are evaluated on the
model's evaluation inputs from benchmarks/peerbench/models.py, as
`compress --inputs` evaluates (modelpress.app.evaluation: worst output's
relative L2 error), and again on its calibration inputs (other samples of the
same source) to show how much of a change is the particular inputs.

An output error this small is mostly the luck of one rounding pattern: the
weights' rounding errors project onto the few outputs in one particular way
(open_nsfw's is 8 probabilities near 0/1). So the run also measures the
expected error of each layout: the RMS output error, over --draws models,
of the original weights plus that output's rounding errors with random signs
(same sizes and layout, other patterns; the same signs for both outputs).

Prints Markdown tables: file bytes and output error before and after with
their ratios, CPU time of the compress call (best of --repeat, one thread),
the group sizes chosen, and how close the choice's error estimate came to the
exact weight error of the size it chose.

    python benchmarks/int8_grouping.py                      # transformer, magika, open_nsfw
    python benchmarks/int8_grouping.py --models mlp,cnn,transformer,magika,open_nsfw,synthetic
    python benchmarks/int8_grouping.py --draws 0            # without the expected errors
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.peerbench.models import suite  # noqa: E402
from modelpress import Options, Quantize, Recipe, compress, decompress  # noqa: E402
from modelpress.app.evaluation import Baseline, EvalSettings  # noqa: E402
from modelpress.core.quantize.grouping import candidates, former_group  # noqa: E402
from modelpress.core.tensorinfo import axes_for  # noqa: E402
from modelpress.formats import open_model  # noqa: E402

DEFAULT_MODELS = "transformer,magika,open_nsfw"


@dataclass
class Side:
    """One output: its file bytes, output errors and compress CPU time."""

    bytes: int
    error: float
    other_error: float
    seconds: float
    expected_error: float = float("nan")


def former_recipe(path: Path) -> Recipe:
    """The former default int8 layout as explicit options: one stage per group size."""
    store = open_model(path)
    by_group: dict[int, list[str]] = defaultdict(list)
    for name, info in store.tensors.items():
        if info.default_target(4096):
            by_group[former_group(info.shape[axes_for(info)[1]])].append(name)
    return Recipe([Quantize(bits=8, group_size=g, include=tuple(names))
                   for g, names in sorted(by_group.items())])


def timed_compress(src: Path, dst: Path, recipe: Recipe, repeat: int):
    best, report = float("inf"), None
    for _ in range(repeat):
        if dst.exists():
            dst.unlink()
        start = time.process_time()
        report = compress(src, dst, recipe, Options(threads=1))
        best = min(best, time.process_time() - start)
    return report, best


def save_inputs(feeds: dict[str, np.ndarray], path: Path) -> Path:
    np.savez(path, **feeds)
    return path


def measure(case, work: Path, repeat: int, draws: int):
    """(former, new) Sides, the new report, and the chosen layouts' estimate/exact ratios."""
    quiet = EvalSettings(max_runs=1, time_budget_s=0.01)
    evaluation = Baseline.prepare(case.onnx, EvalSettings(
        inputs=save_inputs(case.inputs(), work / f"{case.name}_eval.npz"),
        max_runs=quiet.max_runs, time_budget_s=quiet.time_budget_s))
    other = Baseline.prepare(case.onnx, EvalSettings(
        inputs=save_inputs(case.calibration(), work / f"{case.name}_other.npz"),
        max_runs=quiet.max_runs, time_budget_s=quiet.time_budget_s))
    sides, reports = [], []
    for label, recipe in (("former", former_recipe(case.onnx)), ("new", Recipe([Quantize(bits=8)]))):
        dst = work / f"{case.name}_{label}.onnx"
        report, seconds = timed_compress(case.onnx, dst, recipe, repeat)
        sides.append(Side(dst.stat().st_size, evaluation.evaluate(dst).output_error,
                          other.evaluate(dst).output_error, seconds,
                          expected_error(case.onnx, dst, evaluation, draws, work)))
        reports.append(report)
    return sides[0], sides[1], reports[1], estimate_ratios(case.onnx, reports[1])


def expected_error(original: Path, compressed: Path, evaluation: Baseline, draws: int,
                   work: Path) -> float:
    """RMS output error of `draws` models: the original's weights plus the compressed
    model's rounding errors with random signs (seeds 0..draws-1); NaN for no draws."""
    if not draws:
        return float("nan")
    dense = work / "dense.onnx"
    decompress(compressed, dense)
    restored = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(dense)).graph.initializer}
    model = onnx.load(str(original))
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    changed = [n for n, w in weights.items() if n in restored and not np.array_equal(w, restored[n])]
    squares = []
    for seed in range(draws):
        rng = np.random.default_rng(seed)
        for tensor in model.graph.initializer:
            if tensor.name in changed:
                w = weights[tensor.name]
                signs = rng.choice(np.array([-1, 1], w.dtype), size=w.shape)
                tensor.CopyFrom(numpy_helper.from_array(
                    w + signs * (restored[tensor.name] - w), tensor.name))
        flipped = work / "flipped.onnx"
        onnx.save(model, str(flipped))
        squares.append(evaluation.evaluate(flipped).output_error ** 2)
    return float(np.sqrt(np.mean(squares)))


def estimate_ratios(path: Path, report) -> list[float]:
    """For each tensor: the chooser's estimated relative squared error of the layout it
    chose, over the exact one the run measured."""
    store = open_model(path)
    ratios = []
    for row in report.rows:
        info, config = store.tensors[row.name], row.stages[0]
        w = store.read(row.name).astype(np.float32)
        found = candidates(w, info, bits=8, scale_bits=8, zero_bits=None)
        chosen = [c for c in found if c.group_size == config["group_size"]]
        if chosen and not np.isnan(chosen[0].error) and row.error.rel_l2 > 0:
            ratios.append(chosen[0].error / row.error.rel_l2 ** 2)
    return ratios


def layouts(report) -> str:
    """How many tensors got each group size, e.g. "g4x2 g16x5"."""
    counts = Counter(r.stages[0]["group_size"] for r in report.rows)
    return " ".join(f"g{g}x{counts[g]}" for g in sorted(counts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=DEFAULT_MODELS)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--draws", type=int, default=8,
                        help="random-sign models per output for the expected error (0: none)")
    args = parser.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs\n")
    rows, details = [], []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        found = suite(False, work, args.models.split(","))
        for skipped in found.skipped:
            print(f"skipped {skipped.name}: {skipped.reason}")
        for case in found.cases:
            former, new, report, ratios = measure(case, work, args.repeat, args.draws)
            rows.append((case.name, former, new))
            details.append((case.name, layouts(report), ratios))
    print("| model | former bytes | former output error | new bytes | new output error "
          "| bytes new/former | error new/former | error new/former, other inputs "
          f"| expected error new/former ({args.draws} draws) | CPU time new/former |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, old, new in rows:
        print(f"| {name} | {old.bytes:,} | {old.error:.5f} | {new.bytes:,} | {new.error:.5f} "
              f"| {new.bytes / old.bytes:.4f} | {new.error / old.error:.3f} "
              f"| {new.other_error / old.other_error:.3f} "
              f"| {new.expected_error / old.expected_error:.3f} "
              f"| {new.seconds / old.seconds:.2f}x |")
    print()
    print("| model | group sizes chosen | estimated / exact squared error: median (min-max) |")
    print("|---|---|---|")
    for name, chosen, ratios in details:
        r = np.array(ratios)
        print(f"| {name} | {chosen} | {np.median(r):.3f} ({r.min():.3f}-{r.max():.3f}) |")
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
