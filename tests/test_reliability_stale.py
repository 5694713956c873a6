"""Issue 15, item 16: temporary files and folders a SIGKILLed run left beside an output are
removed by the next run writing that output; a live run's are never touched."""

from __future__ import annotations

import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import run_cli

OLD = time.time() - 3600


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".modelpress-tmp"))


def dead_entries(folder: Path, name: str) -> list[Path]:
    """What a killed run leaves: a staging folder (external data) and a temporary file."""
    staged = folder / f".{name}.k1ll3d.modelpress-tmp"
    staged.mkdir()
    (staged / f"{name}.data").write_bytes(bytes(1000))
    (staged / ".model.onnx").write_bytes(b"partial")
    single = folder / f".{name}.d34d00.modelpress-tmp"
    single.write_bytes(b"partial")
    for path in (staged, single):
        os.utime(path, (OLD, OLD))
    return [staged, single]


@pytest.mark.parametrize("extra", [(), ("--external-data", "always")])
def test_a_killed_runs_leftovers_are_removed(tmp_path: Path, samples: Path,
                                             extra: tuple[str, ...]) -> None:
    dead_entries(tmp_path, "o.onnx")
    result = run_cli(["compress", samples / "mlp.onnx", "-o", tmp_path / "o.onnx", *extra,
                      "--no-eval", "quantize"])
    assert result.exit_code == 0, result.output
    assert leftovers(tmp_path) == []


def test_a_live_runs_entries_are_kept(tmp_path: Path, samples: Path) -> None:
    staged, single = dead_entries(tmp_path, "o.onnx")
    fds = [os.open(p, os.O_RDONLY) for p in (staged, single)]
    try:
        for fd in fds:  # what a live run holds
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        result = run_cli(["compress", samples / "mlp.onnx", "-o", tmp_path / "o.onnx",
                          "--external-data", "always", "--no-eval", "quantize"])
        assert result.exit_code == 0, result.output
        assert leftovers(tmp_path) == sorted([staged.name, single.name])
    finally:
        for fd in fds:
            os.close(fd)


def test_young_entries_are_kept(tmp_path: Path, samples: Path) -> None:
    """An entry just created may not be locked yet: only old unlocked ones are stale."""
    staged, single = dead_entries(tmp_path, "o.onnx")
    for path in (staged, single):
        os.utime(path)
    result = run_cli(["compress", samples / "mlp.onnx", "-o", tmp_path / "o.onnx",
                      "--no-eval", "quantize"])
    assert result.exit_code == 0, result.output
    assert len(leftovers(tmp_path)) == 2


def test_sigkill_during_an_external_data_write(tmp_path: Path, samples: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A real SIGKILL between the renames' preparation and the commit."""
    code = ("import sys, time\n"
            "from modelpress.formats.onnx import write\n"
            "write.between_renames = lambda: (print('renaming', flush=True), time.sleep(60))\n"
            "from modelpress.cli.entry import cli\n"
            "cli.main(sys.argv[1:], prog_name='modelpress')\n")
    out = tmp_path / "o.onnx"
    proc = subprocess.Popen([sys.executable, "-c", code, "compress", str(samples / "mlp.onnx"),
                             "-o", str(out), "--external-data", "always", "--no-eval",
                             "quantize"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "renaming"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    left = leftovers(tmp_path)
    assert len(left) == 1  # the staging folder, as issue 15 found it
    os.utime(tmp_path / left[0], (OLD, OLD))
    result = run_cli(["compress", samples / "mlp.onnx", "-o", out, "--external-data", "always",
                      "--no-eval", "quantize"])
    assert result.exit_code == 0, result.output
    assert leftovers(tmp_path) == []
