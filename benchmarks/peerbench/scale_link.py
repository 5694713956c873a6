"""Run the scale benchmark (benchmarks/scale.py, issue 6 item 7b) from run.py, if it is there.

The script runs in its own process (it measures its own children). Its stdout (Markdown tables)
goes into the results as it is. If its --help lists `--json`, run.py passes `--json FILE` and reads
the figures the summary checks from that file (keys in run.py's docstring); if it lists
`--workdir`, the scale files go under the benchmark's temporary folder; `--quick` is passed on
when run.py runs with --quick --scale and the script lists it. Without --json, the figures are
read from its Markdown tables (`parse_tables`; rounded as printed); what cannot be read is left
out, and the summary says NOT MEASURED for it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from .models import ROOT

SCRIPT = ROOT / "benchmarks" / "scale.py"


@dataclass
class ScaleResult:
    """What the scale run printed, its figures (None without --json), and why it is incomplete."""

    text: str
    data: dict | None
    note: str = ""


def run_scale(workdir: Path, script: Path = SCRIPT, timeout: float = 7200.0,
              quick: bool = False, extra: tuple[str, ...] = ()) -> ScaleResult:
    """Run the scale script (with --quick if asked and its --help lists it, then `extra`) and
    collect its output; never raises for a missing or failing script."""
    if not script.is_file():
        note = f"{script.relative_to(ROOT) if script.is_relative_to(ROOT) else script} not present"
        return ScaleResult("", None, note + ": scale benchmark not run")
    try:
        helptext = subprocess.run([sys.executable, str(script), "--help"], cwd=ROOT,
                                  capture_output=True, text=True, timeout=120).stdout
    except (OSError, subprocess.SubprocessError) as exc:
        return ScaleResult("", None, f"{script.name} --help failed: {exc}")
    workdir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(script)]
    if quick and "--quick" in helptext:
        cmd.append("--quick")
    cmd += list(extra)
    json_path = workdir / "scale.json"
    if "--json" in helptext:
        cmd += ["--json", str(json_path)]
    if "--workdir" in helptext:
        cmd += ["--workdir", str(workdir)]
    try:  # stderr (progress) passes through; stdout is the tables
        done = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return ScaleResult("", None, f"{script.name} timed out after {timeout:.0f} s")
    text = done.stdout.strip()
    if done.returncode != 0:
        return ScaleResult(text, None, f"{script.name} exited with code {done.returncode}")
    if "--json" not in helptext:
        data = parse_tables(text)
        note = (f"figures read from {script.name}'s printed tables (rounded as printed)" if data
                else f"{script.name} has no --json and its tables could not be read")
        return ScaleResult(text, data, note)
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return ScaleResult(text, None, f"{script.name} wrote no readable --json file ({exc})")
    return ScaleResult(text, data if isinstance(data, dict) else None)


MIB, GIB = 2 ** 20, 2 ** 30


def _tables(text: str) -> dict[str, list[dict[str, str]]]:
    """Rows (header -> cell) of the first Markdown table after each `### ` heading, by heading."""
    out: dict[str, list[dict[str, str]]] = {}
    heading, header = None, None
    for line in text.splitlines():
        if line.startswith("### "):
            heading, header = line[4:].strip(), None
            out[heading] = []
        elif heading and line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if header is None:
                header = cells
            elif not all(set(c) <= set("-:") for c in cells):
                out[heading].append(dict(zip(header, cells)))
        elif heading and header is not None and not line.strip() and out[heading]:
            heading = None  # the table ended
    return out


def _number(cell: str | None) -> float | None:
    try:
        return float(cell.replace(",", "")) if cell is not None else None
    except ValueError:
        return None


def parse_tables(text: str) -> dict | None:
    """The summary's scale figures from scale.py's printed tables (see run.py for the keys):
    safetensors file size, largest tensor, cp time, int8/int4 times and int4 peak RSS; ONNX
    model size, whether compress and the onnxruntime run of the output succeeded, their peak."""
    tables = _tables(text)
    data: dict = {}
    for heading, rows in tables.items():
        st = re.match(r"safetensors: ([\d.]+) GiB.*largest ([\d,.]+) MiB", heading)
        if st:
            cp = re.search(r"^cp: ([\d.]+) s", text, re.M)
            by = {r.get("run", "").split()[0]: r for r in rows if r.get("run")}
            int8, int4 = by.get("int8", {}), by.get("int4", {})
            peak4 = _number(int4.get("peak RSS MiB"))
            data["safetensors"] = {
                "file_bytes": float(st.group(1)) * GIB,
                "largest_tensor_bytes": float(st.group(2).replace(",", "")) * MIB,
                "cp_seconds": float(cp.group(1)) if cp else None,
                "int8_seconds": _number(int8.get("wall s")),
                "int4_seconds": _number(int4.get("wall s")),
                "int4_peak_rss": peak4 * MIB if peak4 is not None else None}
        big = re.match(r"ONNX: .*?([\d.]+) GB", heading)
        if big:
            compress = [r for r in rows if r.get("run", "").startswith("compress ")]
            ran = [r for r in rows if r.get("run", "").endswith("output in onnxruntime")]
            peaks = [_number(r.get("peak RSS MiB")) for r in compress + ran]
            data["onnx"] = {
                "model_bytes": float(big.group(1)) * 1e9,
                "compressed": bool(compress) and all(p is not None for p in peaks[:len(compress)]),
                "ran": bool(ran) and all(p is not None for p in peaks[len(compress):]),
                "peak_rss": max(peaks) * MIB if peaks and None not in peaks else None}
    return data or None
