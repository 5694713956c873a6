"""modelpress against the tools users would run instead, side by side, on the same machine.

    python benchmarks/run.py [--quick] [--models NAME ...] [--tools TEXT ...] [--no-scale]
                             [--write-results benchmarks/RESULTS.md]

Each tool runs in a fresh process on each model (ONNX, and safetensors where the tool reads it);
its output is read back exactly and compared with the original: time, peak memory, size, bits per
weight, coverage, weight SQNR, and for ONNX the output error, top-1 agreement and latency in
onnxruntime. Installs nothing: a peer that is not importable is a row saying how to install it,
a model whose package is missing is a line saying so. modelpress runs as `python -m modelpress` from this
checkout. A summary then checks issue 6's acceptance items against the measured numbers.

The full run also runs benchmarks/scale.py (the scale benchmark; skipped with --quick unless
--scale, never with --no-scale) if it exists. Its stdout is included as it is; if its --help lists
`--json FILE`, the summary reads from that file, else from its printed tables (see
peerbench/scale_link.py); a missing figure makes the item NOT MEASURED. The keys:
    {"safetensors": {"file_bytes", "largest_tensor_bytes", "cp_seconds", "int8_seconds",
                     "int4_seconds", "int4_peak_rss"},            # bytes and seconds
     "onnx": {"model_bytes", "compressed": bool, "ran": bool, "peak_rss"}}
See the column definitions printed under the tables (report.LEGEND).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.peerbench.tools import Config  # noqa: E402

# modelpress as a user runs it (`modelpress compress IN -o OUT --no-eval --quiet <args>`); update
# after merges. The first 8-bit and first 4-bit rows are the references of the "time vs mp" column
# and of the summary's checks. A row with `needs` runs only if this checkout's `compress --help`
# (or `compress quantize --help`) lists those options; otherwise it is a "skipped" row.
MODELPRESS = [
    Config("modelpress int8", "modelpress", 8, ("quantize", "--bits", "8"),
           formats=("onnx", "safetensors")),
    # The 4-bit reference: every weight at 4 bits (at most 4.5 bits per weight, scales
    # included). ONNX: the default layout (groups of 16, 2-bit zero points; 5-bit log-grid
    # scale codes, 4.44 bits per weight, and for MatMul/Gemm weights of 1M+ elements 4-bit
    # multipliers of a float16 scale per 128 inputs, 4.5, which run in onnxruntime's 8-bit
    # kernel). safetensors: --super-block 128 picks the same multiplier layout (modelpress's
    # own) over compressed-tensors'.
    Config("modelpress int4 --all-layers", "modelpress", 4,
           ("quantize", "--bits", "4", "--all-layers"),
           formats=("onnx", "safetensors"), needs=("--super-block",),
           format_args={"safetensors": ("--super-block", "128")}),
    # The same with --calibration (inputs from the evaluation inputs' source, other samples; see
    # models.py): ONNX rounds with GPTQ, which costs a calibration run and a K x K solve per
    # layer, so it is not the time reference; safetensors rows run without it (a note says so).
    Config("modelpress int4 --all-layers --calibration (gptq)", "modelpress", 4,
           ("quantize", "--bits", "4", "--all-layers"),
           formats=("onnx", "safetensors"), needs=("--calibration", "--super-block"),
           calibrated=True, format_args={"safetensors": ("--super-block", "128")}),
    # The default: embeddings and the output head at up to 6 bits (ONNX; fewer where they hold
    # so much of the model that 6 would add over one bit per weight); compressed-tensors'
    # layout in safetensors.
    Config("modelpress int4", "modelpress", 4, ("quantize", "--bits", "4"),
           formats=("onnx", "safetensors")),
    Config("modelpress int4 g32", "modelpress", 4, ("quantize", "--bits", "4", "--group-size", "32"),
           formats=("onnx", "safetensors")),
    Config("modelpress int8 --onnx-target ort", "modelpress", 8,
           ("--onnx-target", "ort", "quantize", "--bits", "8"), needs=("--onnx-target",)),
    Config("modelpress int4 --onnx-target ort", "modelpress", 4,
           ("--onnx-target", "ort", "quantize", "--bits", "4"), needs=("--onnx-target",)),
]

PEERS = [
    Config("onnxruntime quantize_dynamic (per channel, QInt8)", "ort_dynamic", 8,
           options={"per_channel": True, "weight_type": "QInt8"}),
    Config("onnxruntime MatMulNBits block 32 sym", "ort_nbits", 4,
           options={"bits": 4, "block_size": 32, "is_symmetric": True}),
    Config("onnxruntime MatMulNBits block 32 asym", "ort_nbits", 4,
           options={"bits": 4, "block_size": 32}),
    Config("onnxruntime MatMulNBits defaults (block 128 asym)", "ort_nbits", 4,
           options={"bits": 4}),
    Config("NNCF INT8_ASYM", "nncf", 8, options={"mode": "INT8_ASYM"}),
    Config("NNCF INT4_SYM g32", "nncf", 4, options={"mode": "INT4_SYM", "group_size": 32}),
    Config("NNCF INT4_SYM g128", "nncf", 4, options={"mode": "INT4_SYM", "group_size": 128}),
    Config("NNCF INT4_ASYM g32", "nncf", 4, options={"mode": "INT4_ASYM", "group_size": 32}),
    Config("NNCF INT4_ASYM g128", "nncf", 4, options={"mode": "INT4_ASYM", "group_size": 128}),
    Config("gguf Q8_0", "gguf", 8, options={"type": "Q8_0"}, formats=("onnx", "safetensors"),
           output_suffix=".gguf"),
    Config("gguf Q4_0", "gguf", 4, options={"type": "Q4_0"}, formats=("onnx", "safetensors"),
           output_suffix=".gguf"),
]

from benchmarks.peerbench import bench, models, report, scale_link, summary  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run every model (and the scale benchmark), print the tables and the
    summary, optionally write them all to --write-results."""
    args = _parser().parse_args(argv)
    configs = [c for c in MODELPRESS + PEERS
               if not args.tools or any(t.lower() in c.label.lower() for t in args.tools)]
    refs = {bits: next(c.label for c in MODELPRESS if c.bits == bits) for bits in (8, 4)}
    started = time.strftime("%Y-%m-%d %H:%M %Z")
    clock = time.perf_counter()
    load_before = report.load_average()
    sections: list[str] = []
    results: list[summary.CaseResult] = []
    with tempfile.TemporaryDirectory(prefix="modelpress-bench-", dir=args.workdir) as tmp:
        settings = bench.Settings(Path(tmp), args.latency_budget or (0.5 if args.quick else 3.0),
                                  args.timeout, args.repeat, refs)
        suite = models.suite(args.quick, Path(tmp), args.models)
        for skipped in suite.skipped:
            line = f"model {skipped.name}: skipped, {skipped.reason}"
            bench.log_stderr(line)
            print(f"- {line}\n", flush=True)
            sections.append(f"- {line}")
        for case in suite.cases:
            for fmt, path in (("onnx", case.onnx), ("safetensors", case.safetensors)):
                if path is None:
                    continue
                bench.log_stderr(f"{case.name} ({fmt}): {path}")
                rows, original = bench.run_case(case, fmt, configs, settings, bench.log_stderr)
                text = _section(case, fmt, path, rows, original)
                print(text + "\n", flush=True)
                sections.append(text)
                results.append(summary.CaseResult(
                    case.name, fmt, rows, dict(original.op_elements) if original else {}))
                del original  # its sessions and arrays: the next model needs the memory
        scale = _scale(args, Path(tmp))
    if scale.text or scale.note:
        text = "## Scale (benchmarks/scale.py)\n\n" + (scale.text or f"- {scale.note}")
        print(text + "\n", flush=True)
    checks = summary.checks(results, refs[8], refs[4], scale.data, scale.note)
    checked = "## Acceptance items of issue 6 (checked from the numbers above)\n\n" + \
        summary.table(checks)
    print(checked, flush=True)
    minutes = (time.perf_counter() - clock) / 60
    bench.log_stderr(f"done in {minutes:.1f} min")
    if args.write_results:
        doc = _document(argv, started, minutes, load_before, report.load_average(), sections,
                        scale, checked)
        Path(args.write_results).write_text(doc, encoding="utf-8")
        bench.log_stderr(f"wrote {args.write_results}")
    return 0


def _scale(args, workdir: Path) -> scale_link.ScaleResult:
    why = ("--no-scale" if args.no_scale else None if args.scale else "--quick" if args.quick
           else "a subset of models or tools was asked for" if args.models or args.tools else None)
    if why:
        return scale_link.ScaleResult("", None, f"scale benchmark not run ({why})")
    bench.log_stderr(f"scale: {scale_link.SCRIPT}")
    return scale_link.run_scale(workdir / "scale", quick=args.quick,
                                extra=tuple(shlex.split(args.scale_args or "")))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="sample models and a small synthetic transformer only (a few minutes)")
    p.add_argument("--models", nargs="+", choices=models.ALL_NAMES, metavar="NAME",
                   help=f"only these models ({', '.join(models.ALL_NAMES)})")
    p.add_argument("--tools", nargs="+", metavar="TEXT",
                   help="only configurations whose label contains one of these (e.g. modelpress gguf)")
    p.add_argument("--write-results", "--out", dest="write_results", metavar="RESULTS.md",
                   help="also write the results, the machine and the date to this Markdown file")
    p.add_argument("--scale", action="store_true",
                   help="run benchmarks/scale.py even with --quick (it runs in a full run)")
    p.add_argument("--no-scale", action="store_true", help="do not run benchmarks/scale.py")
    p.add_argument("--scale-args", metavar="ARGS",
                   help='more arguments for benchmarks/scale.py, e.g. "--dtype f32"')
    p.add_argument("--workdir", metavar="DIR", help="where the temporary folder goes (default: system)")
    p.add_argument("--latency-budget", type=float, metavar="S",
                   help="seconds of interleaved runs per latency measurement (default 3, quick 0.5)")
    p.add_argument("--repeat", type=int, default=1, metavar="N",
                   help="timed runs of each tool on each model; the fastest is reported (default 1)")
    p.add_argument("--timeout", type=float, default=3600.0, metavar="S",
                   help="a tool run taking longer is killed and reported as failed")
    return p


def _section(case: models.ModelCase, fmt: str, path: Path, rows: list[report.Row], original) -> str:
    head = f"### {case.name} ({fmt}): {case.description}"
    facts = [f"{path.name}, {path.stat().st_size / 1e6:.3g} MB"]
    if original is not None:
        facts.append(f"{original.elements:,} weight-like elements in {len(original.weights)} weights")
        facts.append(f"inputs: {case.inputs_note}; measured tensor `{original.tensor}`; latency on "
                     f"the first {case.latency_samples} sample(s)")
        if case.calibration_note:
            facts.append(f"calibration inputs (rows with --calibration): {case.calibration_note}")
    else:
        facts.append("weights only: no output error or latency (safetensors holds no graph)")
    return "\n".join([head, "", "; ".join(facts) + ".", "", report.table(rows, onnx=fmt == "onnx")])


def _document(argv, started: str, minutes: float, load_before: str, load_after: str,
              sections: list[str], scale: scale_link.ScaleResult, checked: str) -> str:
    command = "python benchmarks/run.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    lines = [
        "# Benchmark results: modelpress and its peers",
        "",
        f"- Date: {started}; the run took {minutes:.1f} min",
        f"- Command: `{command.strip()}`",
        f"- Load average (1/5/15 min) at start: {load_before}; at end: {load_after}",
        *report.machine(),
        "",
        "## Configurations",
        "",
        *[f"- {c.label}: `{c.shown()}`" for c in MODELPRESS + PEERS],
        "- `<reference>, <peer>'s coverage` (per model, where a peer skips weights): the "
        "reference's command plus `--include GLOB` for each tensor the peer changed",
        "",
        report.LEGEND,
        "## Results",
        "",
    ]
    tail = ["", "## Scale (benchmarks/scale.py)", "", scale.text or f"- {scale.note}", "", checked]
    return "\n".join(lines) + "\n\n".join(sections) + "\n" + "\n".join(tail) + "\n"


if __name__ == "__main__":
    sys.exit(main())
