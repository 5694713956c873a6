"""Issue 15, item 4: outputs honour the umask when new and keep an existing file's mode."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from conftest import run_cli


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def umask():
    """Set the process umask for one test, restored after."""
    saved = os.umask(0o022)
    os.umask(saved)

    def set_mask(value: int) -> None:
        os.umask(value)
    yield set_mask
    os.umask(saved)


CASES = [("mlp.onnx", "o.onnx", ()), ("mlp.onnx", "o.onnx", ("--external-data", "always")),
         ("mlp.safetensors", "o.safetensors", ())]


@pytest.mark.parametrize("src,name,extra", CASES)
@pytest.mark.parametrize("mask", [0o077, 0o022, 0o027])
def test_new_outputs_follow_the_umask(tmp_path: Path, samples: Path, umask, src: str, name: str,
                                      extra: tuple[str, ...], mask: int) -> None:
    umask(mask)
    out, report = tmp_path / name, tmp_path / "r.json"
    result = run_cli(["compress", samples / src, "-o", out, *extra, "--no-eval", "--report",
                      report, "quantize", "--bits", "8"])
    assert result.exit_code == 0, result.output
    written = [out, report] + ([tmp_path / (name + ".data")] if extra else [])
    for path in written:
        assert path.exists()
        assert mode(path) == 0o666 & ~mask, path


@pytest.mark.parametrize("src,name,extra", CASES)
def test_an_existing_outputs_mode_is_kept(tmp_path: Path, samples: Path, umask, src: str,
                                          name: str, extra: tuple[str, ...]) -> None:
    umask(0o022)
    out, report = tmp_path / name, tmp_path / "r.json"
    data = tmp_path / (name + ".data")
    for path, bits in [(out, 0o600), (report, 0o640), (data, 0o604)]:
        path.write_bytes(b"old")
        os.chmod(path, bits)
    result = run_cli(["compress", samples / src, "-o", out, *extra, "--no-eval", "--report",
                      report, "quantize", "--bits", "8"])
    assert result.exit_code == 0, result.output
    assert mode(out) == 0o600 and mode(report) == 0o640
    if extra:
        assert mode(data) == 0o604
