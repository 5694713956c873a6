"""Tool configurations and the commands that run them in a fresh process."""

from __future__ import annotations

import functools
import importlib.util
import json
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .models import ROOT

# driver -> (modules that must be importable, pip command that installs them)
REQUIREMENTS = {
    "ort_dynamic": (["onnxruntime"], "pip install onnxruntime"),
    "ort_nbits": (["onnxruntime", "onnx_ir"], "pip install onnxruntime onnx-ir"),
    "nncf": (["nncf"], "pip install nncf"),
    "gguf": (["gguf"], "pip install gguf"),
}


@dataclass(frozen=True)
class Config:
    """One tool at one setting. `driver` is "modelpress" (the CLI, `args` are its stage
    arguments) or a peer driver of driver.py (`options` are passed to it). `bits` chooses the
    modelpress run whose time is the reference (8 or 4). `formats` are the inputs it reads.
    An equal-coverage row (coverage.py) names in `covers` the peer rows whose weights it takes."""

    label: str
    driver: str
    bits: int
    args: tuple[str, ...] = ()
    options: dict = field(default_factory=dict, hash=False)
    formats: tuple[str, ...] = ("onnx",)
    output_suffix: str = ""
    needs: tuple[str, ...] = ()  # modelpress options this row needs (checked against --help)
    covers: tuple[str, ...] = ()  # peers whose changed weights this row is restricted to
    calibrated: bool = False  # modelpress: add --calibration with the model's calibration inputs
    # modelpress: arguments added after `args` for inputs of one format ("onnx", "safetensors")
    format_args: dict = field(default_factory=dict, hash=False)

    def missing(self) -> str | None:
        """Why this tool cannot run here (with the pip command), or None."""
        if self.driver == "modelpress":
            absent = [flag for flag in self.needs if flag not in modelpress_flags()]
            return (f"this modelpress has no {', '.join(absent)} (`python -m modelpress compress --help`)"
                    if absent else None)
        modules, pip = REQUIREMENTS[self.driver]
        absent = [m for m in modules if _find(m) is None]
        return f"not installed: {', '.join(absent)} ({pip})" if absent else None

    def suffix(self, fmt: str) -> str:
        """File name suffix of the output for an input of this format."""
        return self.output_suffix or (".onnx" if fmt == "onnx" else ".safetensors")

    def command(self, src: Path, dst: Path, calibration: Path | None = None) -> list[str]:
        """The command line, run with cwd = the repository root. `calibration`: the model's
        calibration inputs, passed as --calibration to a row with `calibrated`."""
        launch = [sys.executable, "-m", "benchmarks.peerbench.launch"]
        if self.driver == "modelpress":
            extra = ["--calibration", str(calibration)] if self.calibrated and calibration else []
            fmt = "onnx" if Path(src).suffix == ".onnx" else "safetensors"
            return launch + ["modelpress", "compress", str(src), "-o", str(dst), "--no-eval", "--quiet",
                             *extra, *self.args, *self.format_args.get(fmt, ())]
        return launch + ["benchmarks.peerbench.driver", self.driver, str(src), str(dst),
                         json.dumps(self.options)]

    def shown(self) -> str:
        """How the configuration is called, for the table's notes."""
        if self.driver == "modelpress":
            extra = "--calibration CALIBRATION.npz " if self.calibrated else ""
            shown = "modelpress compress IN -o OUT --no-eval --quiet " + extra + " ".join(self.args)
            for fmt, args in self.format_args.items():
                shown += f" (+ `{' '.join(args)}` for {fmt})"
            return shown
        return f"{self.driver} {json.dumps(self.options)}"


@functools.lru_cache(maxsize=None)
def modelpress_flags() -> frozenset[str]:
    """The long options of this checkout's `compress` command and its stages, read from their
    --help (so that rows needing options from unmerged branches are skipped, not failed)."""
    flags: set[str] = set()
    for extra in ([], ["quantize"]):
        try:
            out = subprocess.run([sys.executable, "-m", "modelpress", "compress", *extra, "--help"],
                                 cwd=ROOT, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.SubprocessError):
            continue
        flags.update(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", out.stdout))
    return frozenset(flags)


def _find(module: str):
    try:
        return importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None


def cwd() -> Path:
    """Where the commands run: the repository root (so `-m modelpress` is this checkout's modelpress)."""
    return ROOT
