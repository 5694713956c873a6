"""Run the scale benchmark (benchmarks/scale.py, issue 6 item 7b) from run.py, if it is there.

The script runs in its own process (it measures its own children). Its stdout (Markdown tables)
goes into the results as it is. If its --help lists `--json`, run.py passes `--json FILE` and reads
the figures the summary checks from that file (keys in run.py's docstring); if it lists
`--workdir`, the scale files go under the benchmark's temporary folder; `--quick` is passed on
when run.py runs with --quick --scale and the script lists it.
"""

from __future__ import annotations

import json
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
              quick: bool = False) -> ScaleResult:
    """Run the scale script (with --quick if asked and its --help lists it) and collect its
    output; never raises for a missing or failing script."""
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
        return ScaleResult(text, None, f"{script.name} has no --json: figures not checked")
    try:
        data = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return ScaleResult(text, None, f"{script.name} wrote no readable --json file ({exc})")
    return ScaleResult(text, data if isinstance(data, dict) else None)
