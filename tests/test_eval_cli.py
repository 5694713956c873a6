"""compress runs both models: output error, accuracy, latency, thresholds, report, Markdown."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from modelpress import REGISTRY, compare

from conftest import ort_run, rng_weights, run_cli, sha256
from mdtables import tables

ROOT = Path(__file__).resolve().parent.parent


def _held_out(samples: Path) -> list[Path]:
    return ["--inputs", samples / "mlp_test_inputs.npz", "--labels", samples / "mlp_test_labels.npy"]


def test_mlp_accuracy_matches_an_independent_onnxruntime_run(tmp_path: Path,
                                                             samples: Path) -> None:
    out, report_path = tmp_path / "m8.onnx", tmp_path / "r.json"
    result = run_cli(["compress", samples / "mlp.onnx", "-o", out, *_held_out(samples),
                      "--report", report_path, "quantize", "--bits", "8"])
    assert result.exit_code == 0, result.output
    x = np.load(samples / "mlp_test_inputs.npz")["input"]
    labels = np.load(samples / "mlp_test_labels.npy")
    ref = ort_run(samples / "mlp.onnx", {"input": x})[0]
    got = ort_run(out, {"input": x})[0]
    evaluation = json.loads(report_path.read_text())["evaluation"]
    assert evaluation["status"] == "ok"
    accuracy = evaluation["accuracy"]
    assert accuracy["labels"] == 1000 and accuracy["output"] == "logits"
    assert accuracy["before"] == float(np.mean(ref.argmax(1) == labels))
    assert accuracy["after"] == float(np.mean(got.argmax(1) == labels))
    assert accuracy["before"] - accuracy["after"] <= 0.005  # int8 loses at most 0.5 points
    (row,) = evaluation["outputs"]
    stats = compare(ref, got)
    assert row["name"] == "logits" and row["shape"] == [1000, 10]
    assert row["rel_error"] == pytest.approx(stats.rel_l2, rel=1e-5)
    assert row["cosine"] == pytest.approx(stats.cosine, rel=1e-6)
    assert row["max_abs_error"] == pytest.approx(stats.max_abs, rel=1e-5)
    assert row["top1_agreement"] == float(np.mean(ref.argmax(1) == got.argmax(1)))
    assert evaluation["latency"]["runs_before"] >= 3 and evaluation["latency"]["after_ms"] > 0
    before, after = f"{100 * accuracy['before']:.2f}%", f"{100 * accuracy['after']:.2f}%"
    assert f"accuracy (1000 labels, output 'logits'): {before} -> {after}" in result.stdout
    assert "latency (median of" in result.stdout and "on this machine" in result.stdout


@pytest.mark.parametrize("stages", [
    ["quantize", "--bits", "8"], ["quantize", "--bits", "4"],
    pytest.param(["lowrank", "--rank-ratio", "0.5"], marks=pytest.mark.skipif(
        "lowrank" not in REGISTRY, reason="the lowrank stage is not in this build")),
])
def test_transformer_random_token_ids_run(tmp_path: Path, samples: Path,
                                          stages: list[str]) -> None:
    out, report_path = tmp_path / "t.onnx", tmp_path / "r.json"
    result = run_cli(["compress", samples / "transformer.onnx", "-o", out, "--report",
                      report_path, *stages])
    assert result.exit_code == 0, result.output
    evaluation = json.loads(report_path.read_text())["evaluation"]
    assert evaluation["status"] == "ok", evaluation["notes"]
    assert evaluation["inputs"] == {"source": "random", "seed": 0, "arrays": {
        "input_ids": {"shape": [1, 16], "dtype": "int64"}}}
    (row,) = evaluation["outputs"]
    assert row["shape"] == [1, 16, 512] and 0 < row["rel_error"] < 1
    assert 0 <= row["top1_agreement"] <= 1


def test_threshold_breach_exits_3_names_it_and_still_writes(tmp_path: Path,
                                                            samples: Path) -> None:
    out, report_path = tmp_path / "m.onnx", tmp_path / "r.json"
    result = run_cli(["compress", samples / "mlp.onnx", "-o", out, "--report", report_path,
                      "--max-output-error", "1e-9", "--min-ratio", "3", "quantize"])
    assert result.exit_code == 3, result.output
    assert out.exists() and report_path.exists()
    report = json.loads(report_path.read_text())
    checks = {c["option"]: c for c in report["thresholds"]["checks"]}
    assert report["thresholds"]["passed"] is False
    assert checks["--max-output-error"]["passed"] is False
    assert checks["--min-ratio"]["passed"] is True
    measured = report["evaluation"]["output_error"]
    assert checks["--max-output-error"]["measured"] == measured
    assert (f"threshold failed: --max-output-error 1e-09: worst output error ('logits') "
            f"{measured:.4g} > 1e-09") in result.stderr
    assert "--min-ratio" not in result.stderr  # only failures go to stderr
    assert "threshold ok: --min-ratio 3: size reduction" in result.stdout


def test_thresholds_that_hold_exit_0(tmp_path: Path, samples: Path) -> None:
    result = run_cli(["compress", samples / "mlp.onnx", "-o", tmp_path / "m.onnx",
                      *_held_out(samples), "--max-error", "0.01", "--max-output-error", "0.02",
                      "--min-accuracy", "91%", "--min-ratio", "3", "quantize"])
    assert result.exit_code == 0, result.output
    assert result.stdout.count("threshold ok:") == 4


@pytest.mark.parametrize("option, value, message", [
    ("--max-error", "0.001", "--max-error 0.001: model weight error"),
    ("--min-accuracy", "0.95", "--min-accuracy 0.95: accuracy after compression"),
    ("--min-ratio", "4", "--min-ratio 4: size reduction (203842 -> "),
])
def test_each_threshold_can_fail(tmp_path: Path, samples: Path, option: str, value: str,
                                 message: str) -> None:
    result = run_cli(["compress", samples / "mlp.onnx", "-o", tmp_path / "m.onnx", "-q",
                      *_held_out(samples), option, value, "quantize"])
    assert result.exit_code == 3, result.output
    assert result.stderr.startswith(f"Error: threshold failed: {message}")


@pytest.mark.parametrize("args, message", [
    (["--no-eval", "--max-output-error", "0.1"], "--no-eval cannot be combined"),
    (["--labels", "y.npy"], "--labels needs --inputs FILE.npz"),
    (["--min-accuracy", "0.9"], "--min-accuracy needs --inputs FILE.npz and --labels"),
    (["--min-accuracy", "120%"], "is not a fraction in [0, 1] or a percentage"),
    (["--dim", "batch"], "is not NAME=VALUE with a positive integer"),
    (["--input-range", "ids=5:1"], "is not NAME=LOW:HIGH with LOW < HIGH"),
    (["--inputs", "x.npz", "--dim", "batch=2"], "--dim and --input-range shape random inputs"),
])
def test_evaluation_usage_errors_exit_2(tmp_path: Path, samples: Path, args: list[str],
                                        message: str) -> None:
    result = run_cli(["compress", samples / "mlp.onnx", "-o", tmp_path / "m.onnx", *args,
                      "quantize"])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "m.onnx").exists()


def test_safetensors_says_output_error_needs_onnx(tmp_path: Path, samples: Path) -> None:
    result = run_cli(["compress", samples / "mlp.safetensors", "-o", tmp_path / "m.safetensors",
                      "--report", tmp_path / "r.json", "quantize"])
    assert result.exit_code == 0, result.output
    note = ("output error not measured: safetensors holds weights only, with no graph to run; "
            "output error needs the ONNX form of the model")
    assert note in " ".join(result.stdout.split())
    evaluation = json.loads((tmp_path / "r.json").read_text())["evaluation"]
    assert evaluation["status"] == "not-applicable" and evaluation["notes"] == [note]
    refused = run_cli(["compress", samples / "mlp.safetensors", "-o", tmp_path / "n.safetensors",
                       "--max-output-error", "0.1", "quantize"])
    assert refused.exit_code == 2 and "need an ONNX model" in refused.output


def test_bad_inputs_file_stops_before_writing(tmp_path: Path, samples: Path) -> None:
    np.savez(tmp_path / "x.npz", features=np.zeros((2, 64), np.float32))
    result = run_cli(["compress", samples / "mlp.onnx", "-o", tmp_path / "m.onnx", "--inputs",
                      tmp_path / "x.npz", "quantize"])
    assert result.exit_code == 1
    assert result.output.strip() == (
        f"Error: {tmp_path / 'x.npz'}: no array for model input 'input' (the file has features; "
        "the model needs input)")
    assert not (tmp_path / "m.onnx").exists()


def _unrunnable(path: Path) -> Path:
    """A valid ONNX model with an operator onnxruntime does not have."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"]),
         helper.make_node("Mystery", ["h"], ["y"], domain="com.example")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64])],
        [numpy_helper.from_array(rng_weights(64, 64), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.example", 1)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_model_onnxruntime_cannot_run_is_a_note(tmp_path: Path) -> None:
    src = _unrunnable(tmp_path / "odd.onnx")
    result = run_cli(["compress", src, "-o", tmp_path / "o.onnx", "--report", tmp_path / "r.json",
                      "quantize"])
    assert result.exit_code == 0, result.output
    assert "output error not measured: onnxruntime cannot load" in result.stdout
    evaluation = json.loads((tmp_path / "r.json").read_text())["evaluation"]
    assert evaluation["status"] == "failed" and evaluation["outputs"] == []
    assert "com.example:Mystery" in evaluation["notes"][0]
    gated = run_cli(["compress", src, "-o", tmp_path / "p.onnx", "--max-output-error", "0.1",
                     "quantize"])
    assert gated.exit_code == 3
    assert "threshold failed: --max-output-error 0.1: output error was not measured" in \
        gated.stderr


def test_missing_onnxruntime_is_a_note(tmp_path: Path, samples: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # makes `import onnxruntime` fail
    result = run_cli(["compress", samples / "mlp.onnx", "-o", tmp_path / "m.onnx", "--report",
                      tmp_path / "r.json", "quantize"])
    assert result.exit_code == 0, result.output
    assert ("output error not measured: onnxruntime is not installed "
            "(pip install 'modelpress[run]')") in result.stdout
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["evaluation"]["status"] == "unavailable"
    assert report["versions"]["onnxruntime"] is not None  # installed, just not importable here


def test_no_eval_skips_running(tmp_path: Path, samples: Path) -> None:
    result = run_cli(["compress", samples / "mlp.onnx", "-o", tmp_path / "m.onnx", "--no-eval",
                      "--format", "json", "quantize"])
    assert result.exit_code == 0, result.output
    evaluation = json.loads(result.stdout)["evaluation"]
    assert evaluation["status"] == "skipped" and evaluation["outputs"] == []


def test_report_records_versions_digests_recipe_and_limits(tmp_path: Path,
                                                           samples: Path) -> None:
    out, report_path = tmp_path / "m.onnx", tmp_path / "r.json"
    result = run_cli(["compress", samples / "mlp.onnx", "-o", out, "--report", report_path,
                      "--max-error", "0.5", "quantize", "--bits", "4"])
    assert result.exit_code == 0, result.output
    report = json.loads(report_path.read_text())
    assert report["input_sha256"] == sha256(samples / "mlp.onnx")
    assert report["output_sha256"] == sha256(out)
    from importlib.metadata import version
    assert report["versions"]["numpy"] == np.__version__
    assert report["versions"]["onnx"] == onnx.__version__
    assert report["versions"]["onnxruntime"] == version("onnxruntime")
    assert {"modelpress", "python", "safetensors", "ml_dtypes"} <= set(report["versions"])
    # Unset options stay unset in the recipe: they are resolved per tensor and format.
    assert report["recipe"]["stages"][0] == {
        "id": "quantize", "bits": 4, "scheme": None, "granularity": None, "group_size": None,
        "method": None, "scale_bits": None, "zero_bits": None, "super_block": None,
        "backup_bits": None, "all_layers": False, "activations": None,
        "sequential": True}
    assert report["thresholds"]["limits"] == {"max_error": 0.5, "max_output_error": None,
                                              "min_accuracy": None, "min_ratio": None}
    assert report["thresholds"]["passed"] is True


def test_markdown_is_valid_tables_with_evaluation(tmp_path: Path, samples: Path) -> None:
    result = run_cli(["compress", samples / "mlp.onnx", "-o", tmp_path / "m.onnx",
                      *_held_out(samples), "--max-output-error", "0.5", "--format", "markdown",
                      "quantize"])
    assert result.exit_code == 0, result.output
    found = tables(result.stdout)
    headers = [t[0] for t in found]
    assert headers == [
        ["tensor", "shape", "encoding", "before", "after", "ratio", "rel. error", "SQNR dB"],
        ["output", "shape", "rel. error", "cosine", "max abs error", "top-1 agreement"],
        ["measure", "before", "after", "change"],
        ["threshold", "limit", "measured", "result"]]
    assert [r[0] for r in found[1][1:]] == ["logits"]
    assert [r[0] for r in found[2][1:]] == ["accuracy (1000 labels)",
                                            "latency, median ms (this machine)"]
    assert found[3][1][0] == "`--max-output-error`" and found[3][1][3] == "pass"


def test_help_and_inspect_do_not_import_onnxruntime(samples: Path) -> None:
    code = ("import sys\n"
            "from click.testing import CliRunner\n"
            "from modelpress.cli.entry import cli\n"
            "r = CliRunner()\n"
            "assert r.invoke(cli, ['--help']).exit_code == 0\n"
            "assert r.invoke(cli, ['compress', '--help']).exit_code == 0\n"
            "assert r.invoke(cli, ['sweep', '--help']).exit_code == 0\n"
            f"assert r.invoke(cli, ['inspect', {str(samples / 'mlp.onnx')!r}]).exit_code == 0\n"
            "print(sorted(m for m in ('onnxruntime', 'matplotlib') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "[]"


def test_help_documents_exit_code_3() -> None:
    for args in (["--help"], ["compress", "--help"]):
        assert "3 a" in " ".join(run_cli(args).output.split())
