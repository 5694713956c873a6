"""Issue 15, items 3 and 8: every path a run writes differs from every path it reads, and a
report or plot path that cannot be written is refused before any work starts (exit 2)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conftest import run_cli, sha256


@pytest.fixture
def files(tmp_path: Path, samples: Path) -> dict[str, Path]:
    inputs = tmp_path / "x.npz"
    np.savez(inputs, input=np.load(samples / "mlp_test_inputs.npz")["input"][:8])
    labels = tmp_path / "y.npy"
    np.save(labels, np.load(samples / "mlp_test_labels.npy")[:8])
    calib = tmp_path / "c.npz"
    np.savez(calib, input=np.load(samples / "mlp_test_inputs.npz")["input"][8:16])
    recipe = tmp_path / "r.yaml"
    recipe.write_text("version: 1\nstages:\n  - {id: quantize, bits: 8}\n")
    return {"--inputs": inputs, "--labels": labels, "--calibration": calib, "--recipe": recipe}


@pytest.mark.parametrize("target", ["--inputs", "--labels", "--calibration", "--recipe"])
def test_report_onto_a_read_file_is_refused(tmp_path: Path, samples: Path,
                                            files: dict[str, Path], target: str) -> None:
    before = {k: sha256(p) for k, p in files.items()}
    out = tmp_path / "o.onnx"
    args = ["compress", samples / "mlp.onnx", "-o", out, "--report", files[target],
            "--recipe", files["--recipe"]]
    if target in ("--inputs", "--labels"):
        args += ["--inputs", files["--inputs"], "--labels", files["--labels"]]
    if target == "--calibration":
        args += ["--calibration", files["--calibration"]]
    result = run_cli(args)
    assert result.exit_code == 2, result.output
    assert f"--report {files[target]} is the {target} file; give another file name" in result.output
    assert not out.exists()
    assert {k: sha256(p) for k, p in files.items()} == before


@pytest.mark.parametrize("target", ["--inputs", "--labels", "--recipes", "--report"])
def test_sweep_plot_onto_a_read_file_is_refused(tmp_path: Path, samples: Path,
                                                files: dict[str, Path], target: str) -> None:
    recipes = tmp_path / "rs.yaml"
    recipes.write_text("- name: int8\n  stages: [{id: quantize, bits: 8}]\n")
    report = tmp_path / "rep.json"
    named = {**files, "--recipes": recipes, "--report": report}
    before = {k: sha256(p) for k, p in named.items() if p.exists()}
    args = ["sweep", samples / "mlp.onnx", "--plot", named[target], "--recipes", recipes,
            "--inputs", files["--inputs"], "--labels", files["--labels"], "--report", report]
    result = run_cli(args)
    assert result.exit_code == 2, result.output
    expected = ("is the --plot file" if target == "--report" else f"is the {target} file")
    assert f"{expected}; give another file name" in result.output
    assert {k: sha256(p) for k, p in named.items() if p.exists()} == before


def test_report_onto_the_outputs_data_file_is_refused(tmp_path: Path, samples: Path) -> None:
    out = tmp_path / "o.onnx"
    result = run_cli(["compress", samples / "mlp.onnx", "-o", out, "--report",
                      tmp_path / "o.onnx.data", "quantize"])
    assert result.exit_code == 2, result.output
    assert "is the data file of the output model" in result.output


@pytest.mark.parametrize("where", ["folder", "missing"])
def test_unwritable_report_is_refused_before_the_work(tmp_path: Path, samples: Path,
                                                      where: str) -> None:
    report = tmp_path if where == "folder" else tmp_path / "no" / "such" / "r.json"
    out = tmp_path / "o.onnx"
    result = run_cli(["compress", samples / "mlp.onnx", "-o", out, "--report", report,
                      "quantize"])
    assert result.exit_code == 2, result.output
    assert "internal error" not in result.output
    expected = "is a folder" if where == "folder" else "does not exist"
    assert expected in result.output
    assert not out.exists()


def test_unwritable_plot_is_refused_before_the_work(tmp_path: Path, samples: Path) -> None:
    result = run_cli(["sweep", samples / "mlp.onnx", "--no-eval", "--plot",
                      tmp_path / "nope" / "p.png"])
    assert result.exit_code == 2, result.output
    assert "does not exist" in result.output
