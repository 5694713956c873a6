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
PROBE = """
import json, resource, sys
from click.testing import CliRunner
from modelpress.cli.main import cli
result = CliRunner().invoke(cli, sys.argv[1:])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
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
