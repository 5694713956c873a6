"""Issue 15, items 10 and 11: memory is bounded by the model and options, not by a number
an option or a file claims. Each case runs in its own process; its peak RSS is measured
(resource.getrusage) and must stay under 500 MB, its time under 60 s.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

LIMIT_MB = 500
# Runs the CLI in this process and prints exit code, peak RSS (MB) and the output, as JSON.
# The peak is VmHWM, this process image's own: Linux keeps ru_maxrss across fork and exec, so
# a child of a large pytest process (one that has loaded torch for the transformers tests)
# would report the parent's size.
PROBE = """
import json, resource, sys
from click.testing import CliRunner
from modelpress.cli.entry import cli
result = CliRunner().invoke(cli, sys.argv[1:])
with open("/proc/self/status") as status:
    peak = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) // 1024
print(json.dumps({"code": result.exit_code, "peak_mb": peak, "output": result.output,
                  "error": None if result.exception is None or isinstance(result.exception,
                  SystemExit) else repr(result.exception)}))
"""


def probe(*args: object) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, *map(str, args)], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"peak RSS {found['peak_mb']} MB: {' '.join(map(str, args))}")
    return found


@pytest.mark.parametrize("group", ["4000000", "1000000000000", str(2**63 - 1), "65536"])
@pytest.mark.parametrize("model", ["mlp.onnx", "mlp.safetensors"])
def test_huge_group_size_is_refused_in_bounded_memory(tmp_path: Path, samples: Path,
                                                      model: str, group: str) -> None:
    out = tmp_path / f"o{Path(model).suffix}"
    found = probe("compress", samples / model, "-o", out, "--no-eval", "quantize", "--bits",
                  "4", "--group-size", group)
    assert found["code"] == 1, found
    assert found["error"] is None
    assert f"--group-size {group} is far longer than its 64 inputs per output" in found["output"]
    assert found["peak_mb"] < LIMIT_MB
    assert not out.exists()


def test_group_size_in_a_recipe_file_is_bounded(tmp_path: Path, samples: Path) -> None:
    recipe = tmp_path / "r.json"
    for value in (1e23, 10**23):
        recipe.write_text(json.dumps({"version": 1, "stages": [{"id": "quantize", "bits": 4,
                                                                "group_size": value}]}))
        found = probe("compress", samples / "mlp.onnx", "-o", tmp_path / "o.onnx", "--no-eval",
                      "--recipe", recipe)
        assert found["code"] in (1, 2), found
        assert found["error"] is None
        assert found["peak_mb"] < LIMIT_MB


def test_a_long_group_still_works(tmp_path: Path, samples: Path) -> None:
    """Groups up to 16 times the axis stay one group per row (the sweep's g128 on mlp)."""
    found = probe("compress", samples / "mlp.onnx", "-o", tmp_path / "o.onnx", "--no-eval",
                  "quantize", "--bits", "4", "--group-size", "1024")
    assert found["code"] == 0, found
    assert found["peak_mb"] < LIMIT_MB


def _npy_claiming(shape: tuple[int, ...]) -> bytes:
    """An .npy header claiming `shape` of float32, over 64 bytes of data."""
    import struct
    header = f"{{'descr': '<f4', 'fortran_order': False, 'shape': {shape}, }}"
    header += " " * (63 - (10 + len(header)) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + bytes(64)


@pytest.fixture
def bad_inputs(tmp_path: Path) -> dict[str, Path]:
    import zipfile

    import numpy as np
    files = {}
    files["zeros-2M"] = tmp_path / "zeros.npz"  # 0.5 MB on disk, 488 MiB loaded
    np.savez_compressed(files["zeros-2M"], input=np.zeros((2_000_000, 64), np.float32))
    files["claims-1e11"] = tmp_path / "claims.npz"
    with zipfile.ZipFile(files["claims-1e11"], "w") as archive:
        archive.writestr("input.npy", _npy_claiming((10**11, 64)))
    files["empty"] = tmp_path / "empty.npz"
    files["empty"].write_bytes(b"")
    files["npy-renamed"] = tmp_path / "renamed.npz"
    with open(files["npy-renamed"], "wb") as fh:
        np.save(fh, np.zeros((4, 64), np.float32))
    files["zero-samples"] = tmp_path / "none.npz"
    np.savez(files["zero-samples"], input=np.zeros((0, 64), np.float32))
    return files


EXPECTED = {
    "zeros-2M": "its arrays take 488 MiB in memory, over the 64 MiB limit for evaluation "
                "inputs; use fewer samples or raise --max-input-size",
    "claims-1e11": "its arrays take 24,414,062 MiB in memory, over the 64 MiB limit for "
                   "evaluation inputs; use fewer samples or raise --max-input-size",
    "empty": "expected an .npz archive of arrays by input name (numpy.savez)",
    "npy-renamed": "expected an .npz archive of arrays by input name (numpy.savez)",
    "zero-samples": "array 'input' has shape [0, 64], no samples; give at least one",
}


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_bad_inputs_are_refused_from_headers(tmp_path: Path, samples: Path,
                                             bad_inputs: dict[str, Path], case: str) -> None:
    out = tmp_path / "o.onnx"
    found = probe("compress", samples / "mlp.onnx", "-o", out, "--inputs", bad_inputs[case],
                  "quantize")
    assert found["code"] == 1, found
    assert found["error"] is None
    assert found["output"].strip() == f"Error: {bad_inputs[case]}: {EXPECTED[case]}"
    assert found["peak_mb"] < LIMIT_MB
    assert not out.exists()


def test_huge_dim_is_refused(tmp_path: Path, samples: Path) -> None:
    found = probe("compress", samples / "mlp.onnx", "-o", tmp_path / "o.onnx", "--dim",
                  "batch=5000000", "quantize")
    assert found["code"] == 1, found
    assert found["output"].strip() == (
        "Error: random inputs of shapes input [5000000, 64] take 1,221 MiB, over the 64 MiB "
        "limit for evaluation inputs; give smaller --dim values or raise --max-input-size")
    assert found["peak_mb"] < LIMIT_MB


def test_labels_claiming_a_huge_array_are_refused(tmp_path: Path, samples: Path) -> None:
    labels = tmp_path / "y.npy"
    labels.write_bytes(_npy_claiming((10**11,)))
    found = probe("compress", samples / "mlp.onnx", "-o", tmp_path / "o.onnx", "--inputs",
                  samples / "mlp_test_inputs.npz", "--labels", labels, "quantize")
    assert found["code"] == 1, found
    assert "over the 64 MiB limit for evaluation inputs" in found["output"]
    assert found["peak_mb"] < LIMIT_MB


def test_large_inputs_run_in_slices(tmp_path: Path, samples: Path) -> None:
    """Inputs near the limit run in slices of samples: activations stay bounded."""
    found = probe("compress", samples / "mlp.onnx", "-o", tmp_path / "o.onnx", "--dim",
                  "batch=100000", "--format", "json", "quantize")
    assert found["code"] == 0, found
    assert found["peak_mb"] < LIMIT_MB
    evaluation = json.loads(found["output"])["evaluation"]
    assert evaluation["status"] == "ok"


def test_max_input_size_raises_the_limit(tmp_path: Path, samples: Path) -> None:
    found = probe("compress", samples / "mlp.onnx", "-o", tmp_path / "o.onnx", "--dim",
                  "batch=300000", "--max-input-size", "50MB", "quantize")
    assert found["code"] == 1
    assert "over the 48 MiB limit" in found["output"]
