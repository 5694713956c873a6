"""Runs that do not need the heavy dependencies do not import them (issue 14).

`import ml_dtypes` alone takes most of a second, and onnx imports it; `--help`,
`--version` and a safetensors run of float32 weights need neither, nor
onnxruntime or matplotlib. Each command runs in a fresh interpreter, as the
console script would, and reports what sys.modules holds as it exits. Speed
itself is measured in benchmarks/startup.py, not here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"
HEAVY = ("ml_dtypes", "onnx", "onnxruntime", "matplotlib")

# At exit (click ends with sys.exit), write which heavy top-level packages were imported.
PROBE = """
import atexit, json, runpy, sys
out, heavy, args = sys.argv[1], sys.argv[2].split(","), sys.argv[3:]
def report():
    with open(out, "w") as f:
        json.dump(sorted(name for name in heavy if name in sys.modules), f)
atexit.register(report)
sys.argv = ["modelpress", *args]
runpy.run_module("modelpress", run_name="__main__", alter_sys=True)
"""


def heavy_imports(tmp_path: Path, *args: str) -> list[str]:
    """Run `modelpress ARGS` in a new interpreter; the heavy packages it imported."""
    out = tmp_path / "modules.json"
    done = subprocess.run([sys.executable, "-c", PROBE, str(out), ",".join(HEAVY), *args],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(out.read_text())


@pytest.mark.parametrize("flag", ["--help", "--version"])
def test_help_and_version_import_no_heavy_dependency(tmp_path, flag):
    assert heavy_imports(tmp_path, flag) == []


def test_safetensors_int8_run_imports_no_heavy_dependency(tmp_path):
    source = SAMPLES / "mlp.safetensors"
    with safe_open(str(source), framework="np") as f:
        # The point is a float32 file: bf16 or fp8 data would need ml_dtypes.
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
    out = tmp_path / "mlp-int8.safetensors"
    assert heavy_imports(tmp_path, "compress", str(source), "-o", str(out), "quantize", "--bits", "8") == []
    assert out.stat().st_size < source.stat().st_size
