"""modelpress against the tools users would run instead, side by side, on the same machine.

    python benchmarks/run.py [--quick] [--models NAME ...] [--out RESULTS.md]

Each tool runs in a fresh process on each model (ONNX, and safetensors where the tool reads it);
its output is read back exactly and compared with the original: time, peak memory, size, bits per
weight, coverage, weight SQNR, and for ONNX the output error, top-1 agreement and latency in
onnxruntime. Installs nothing: a peer that is not importable is a row saying how to install it.
See benchmarks/README.md for the environment and the definitions of the columns.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.peerbench.tools import Config  # noqa: E402

# modelpress as a user runs it (`modelpress compress IN -o OUT <args>`); update after merges.
# The first 8-bit and first 4-bit rows are the references of the "time vs mp" column.
MODELPRESS = [
    Config("modelpress int8", "modelpress", 8, ("quantize", "--bits", "8"),
           formats=("onnx", "safetensors")),
    Config("modelpress int4", "modelpress", 4, ("quantize", "--bits", "4"),
           formats=("onnx", "safetensors")),
    Config("modelpress int4 g32", "modelpress", 4, ("quantize", "--bits", "4", "--group-size", "32"),
           formats=("onnx", "safetensors")),
    Config("modelpress int4 g32 asym", "modelpress", 4,
           ("quantize", "--bits", "4", "--group-size", "32", "--scheme", "asym"),
           formats=("onnx", "safetensors")),
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

from benchmarks.peerbench import bench, models, report  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run every model, print the tables, optionally write them to --out."""
    args = _parser().parse_args(argv)
    configs = [c for c in MODELPRESS + PEERS
               if not args.tools or any(t.lower() in c.label.lower() for t in args.tools)]
    references = {bits: next(c.label for c in MODELPRESS if c.bits == bits) for bits in (8, 4)}
    started = time.strftime("%Y-%m-%d %H:%M %Z")
    load_before = report.load_average()
    sections: list[str] = []
    with tempfile.TemporaryDirectory(prefix="modelpress-bench-", dir=args.workdir) as tmp:
        settings = bench.Settings(Path(tmp), args.latency_budget or (0.5 if args.quick else 2.0),
                                  args.timeout, args.repeat, references)
        suite = models.suite(args.quick, Path(tmp), args.models)
        for skipped in suite.skipped:
            line = f"model {skipped.name}: skipped, {skipped.reason}"
            bench.log_stderr(line)
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
    load_after = report.load_average()
    if args.out:
        Path(args.out).write_text(_document(argv, args, started, load_before, load_after, sections),
                                  encoding="utf-8")
        bench.log_stderr(f"wrote {args.out}")
    return 0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="sample models and a small synthetic transformer only (a few minutes)")
    p.add_argument("--models", nargs="+", choices=models.ALL_NAMES, metavar="NAME",
                   help=f"only these models ({', '.join(models.ALL_NAMES)})")
    p.add_argument("--tools", nargs="+", metavar="TEXT",
                   help="only configurations whose label contains one of these (e.g. modelpress gguf)")
    p.add_argument("--out", metavar="RESULTS.md", help="also write the results to this Markdown file")
    p.add_argument("--workdir", metavar="DIR", help="where the temporary folder goes (default: system)")
    p.add_argument("--latency-budget", type=float, metavar="S",
                   help="seconds of interleaved runs per latency measurement (default 2, quick 0.5)")
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
    else:
        facts.append("weights only: no output error or latency (safetensors holds no graph)")
    return "\n".join([head, "", "; ".join(facts) + ".", "", report.table(rows, onnx=fmt == "onnx")])


def _document(argv, args, started: str, load_before: str, load_after: str,
              sections: list[str]) -> str:
    command = "python benchmarks/run.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        "# Benchmark results: modelpress and its peers",
        "",
        "**Preliminary**: measured on a shared machine while other work was running (see the load "
        "average), before the issue-6 branches (faster ONNX forms, better 4/8-bit schemes, "
        "streaming) merged. To be re-run on a quiet machine after they merge.",
        "",
        f"- Date: {started}",
        f"- Command: `{command.strip()}`",
        f"- Load average (1/5/15 min) at start: {load_before}; at end: {load_after}",
        *report.machine(),
        "",
        "## Configurations",
        "",
        *[f"- {c.label}: `{c.shown()}`" for c in MODELPRESS + PEERS],
        "",
        report.LEGEND,
        "## Results",
        "",
    ]
    return "\n".join(lines) + "\n\n".join(sections) + "\n"


if __name__ == "__main__":
    sys.exit(main())
