"""Issue 15, item 14: Ctrl-C during start-up, and just after the output is in place."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from modelpress.formats import atomic
from modelpress.formats.onnx import write

from conftest import run_cli, sha256


def test_interrupt_while_starting_is_not_a_traceback() -> None:
    """A KeyboardInterrupt raised while the command's modules import."""
    done = subprocess.run([sys.executable, "-c", "import modelpress.cli\n"
                           "raise KeyboardInterrupt"], capture_output=True, text=True,
                          timeout=60)
    assert "Traceback" not in done.stderr
    assert done.stderr.strip() == "Aborted!"
    assert done.returncode != 0


def test_other_errors_still_show_their_traceback() -> None:
    done = subprocess.run([sys.executable, "-c", "import modelpress.cli\nraise ValueError(7)"],
                          capture_output=True, text=True, timeout=60)
    assert "Traceback" in done.stderr and "ValueError: 7" in done.stderr


@pytest.mark.parametrize("extra", [(), ("--external-data", "always")])
def test_interrupt_just_after_the_final_rename(tmp_path: Path, samples: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               extra: tuple[str, ...]) -> None:
    def interrupted(folder: Path) -> None:
        raise KeyboardInterrupt
    monkeypatch.setattr(atomic, "fsync_dir", interrupted)
    monkeypatch.setattr(write, "fsync_dir", interrupted)
    out = tmp_path / "o.onnx"
    result = run_cli(["compress", samples / "mlp.onnx", "-o", out, *extra, "--no-eval",
                      "quantize"])
    assert result.exit_code == 130, result.output
    assert result.output.strip() == (f"Error: interrupted after {out} was written completely; "
                                     "the table, --report, evaluation and threshold checks did "
                                     "not run")
    monkeypatch.undo()
    again = tmp_path / "again" / "o.onnx"  # the same name: the model names its data file
    again.parent.mkdir()
    assert run_cli(["compress", samples / "mlp.onnx", "-o", again, *extra, "--no-eval",
                    "quantize"]).exit_code == 0
    assert sha256(out) == sha256(again)


def test_interrupt_before_the_rename_still_aborts(tmp_path: Path, samples: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "o.onnx"
    out.write_bytes(b"old")

    def interrupted(*args: object) -> None:
        raise KeyboardInterrupt
    monkeypatch.setattr(write, "between_renames", interrupted)
    result = run_cli(["compress", samples / "mlp.onnx", "-o", out, "--external-data", "always",
                      "--no-eval", "quantize"])
    assert result.exit_code == 1
    assert result.output.strip() == "Aborted!"
