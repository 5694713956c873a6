"""Issue 15, item 12: numeric options that are NaN or infinite are usage errors (exit 2).

A NaN passed every range check and then failed every threshold (exit 3);
--input-range -inf:inf ended in an OverflowError. Stage options already
refuse them in the stage's constructor; they are checked here too.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import run_cli

BAD = ["nan", "NaN", "inf", "-inf", "1e400"]


@pytest.mark.parametrize("value", BAD)
@pytest.mark.parametrize("option", ["--max-error", "--max-output-error", "--min-ratio",
                                    "--min-accuracy"])
def test_threshold_must_be_finite(tmp_path: Path, samples: Path, option: str,
                                  value: str) -> None:
    out = tmp_path / "o.onnx"
    result = run_cli(["compress", samples / "mlp.onnx", "-o", out, option, value, "quantize"])
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '{option}'" in result.output
    assert not out.exists()


@pytest.mark.parametrize("value", ["x=-inf:inf", "x=nan:1", "x=0:nan", "x=-1e308:1e308",
                                   "x=0:inf"])
def test_input_range_must_be_finite(tmp_path: Path, samples: Path, value: str) -> None:
    value = value.replace("x=", "input=")
    result = run_cli(["compress", samples / "mlp.onnx", "-o", tmp_path / "o.onnx",
                      "--input-range", value, "quantize"])
    assert result.exit_code == 2, result.output
    assert "Invalid value for '--input-range'" in result.output
    assert "must be finite numbers" in result.output


@pytest.mark.parametrize("stage", [["prune", "--sparsity"], ["lowrank", "--energy"],
                                   ["lowrank", "--rank-ratio"], ["quantize", "--bits"],
                                   ["quantize", "--group-size"], ["cluster", "--clusters"]])
@pytest.mark.parametrize("value", ["nan", "inf", "-1", "0", "1e400"])
def test_stage_numbers_are_usage_errors(tmp_path: Path, samples: Path, stage: list[str],
                                        value: str) -> None:
    """Every stage option at NaN, inf, 0, negative and huge: exit 0 or 2, never a traceback."""
    out = tmp_path / "o.onnx"
    result = run_cli(["compress", samples / "mlp.onnx", "-o", out, "--no-eval", *stage, value])
    assert result.exit_code in (0, 2), result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    if result.exit_code == 2:
        assert not out.exists()
