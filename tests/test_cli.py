"""The command line: the README's commands, exact exit codes and error lines."""

from __future__ import annotations

import click
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from modelpress.cli.entry import cli
from modelpress import compare
from modelpress.formats import open_model

from conftest import ort_run, run_cli, sha256


def accuracy(model: Path, samples: Path) -> float:
    x = np.load(samples / "mlp_test_inputs.npz")["input"]
    labels = np.load(samples / "mlp_test_labels.npy")
    return float((ort_run(model, {"input": x})[0].argmax(axis=1) == labels).mean())


def test_mlp_int8_readme_command(tmp_path: Path, samples: Path) -> None:
    out = tmp_path / "m8.onnx"
    result = run_cli(["compress", samples / "mlp.onnx", "-o", out, "quantize", "--bits", "8",
                      "--report", tmp_path / "r.json"])
    assert result.exit_code == 0, result.output
    assert out.stat().st_size <= 0.30 * (samples / "mlp.onnx").stat().st_size
    onnx.checker.check_model(str(out), full_check=True)
    before, after = accuracy(samples / "mlp.onnx", samples), accuracy(out, samples)
    assert before - after <= 0.005
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["totals"]["file_bytes_after"] == out.stat().st_size
    assert report["totals"]["file_bytes_before"] == (samples / "mlp.onnx").stat().st_size
    assert {t["name"] for t in report["tensors"]} == {"fc1.weight", "fc2.weight"}
    assert "fc1.weight" in result.stdout and "int8 g16 sym s8" in result.stdout


def test_transformer_int4_g32(tmp_path: Path, samples: Path) -> None:
    out = tmp_path / "t4.onnx"
    result = run_cli(["compress", samples / "transformer.onnx", "-o", out, "quantize", "--bits",
                      "4", "--group-size", "32"])
    assert result.exit_code == 0, result.output
    assert out.stat().st_size <= 0.20 * (samples / "transformer.onnx").stat().st_size
    onnx.checker.check_model(str(out), full_check=True)
    ids = np.load(samples / "transformer_test_inputs.npz")["input_ids"]
    ref = ort_run(samples / "transformer.onnx", {"input_ids": ids})[0]
    got = ort_run(out, {"input_ids": ids})[0]
    # Issue 2: under 10%. Measured 0.0786 at 0.196x: the embeddings and the LM head hold 58% of
    # the weights and pass their error straight to the logits; the default backup gives them
    # 5 bits (one extra bit on 58% of the weights, within the one-bit budget). At 4 bits they
    # measured 0.114.
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.10
    assert "int5 g32 asym s8" in result.stdout
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.90
    assert "opset raised from 17 to 18" in result.stdout


def test_transformer_int4_default_groups(tmp_path: Path, samples: Path) -> None:
    out = tmp_path / "t4.onnx"
    result = run_cli(["compress", samples / "transformer.onnx", "-o", out, "--no-eval",
                      "quantize", "--bits", "4"])
    assert result.exit_code == 0, result.output
    assert out.stat().st_size <= 0.20 * (samples / "transformer.onnx").stat().st_size
    ids = np.load(samples / "transformer_test_inputs.npz")["input_ids"]
    ref = ort_run(samples / "transformer.onnx", {"input_ids": ids})[0]
    got = ort_run(out, {"input_ids": ids})[0]
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.10   # measured 0.0683
    assert "int4 g16 asym s5 z2" in result.stdout and "int5 g16 asym s5 z2" in result.stdout


@pytest.mark.parametrize("stages", [["quantize", "--bits", "8", "prune", "--sparsity", "0.5"],
                                    ["prune", "--sparsity", "0.5", "quantize", "--bits", "8"]])
@pytest.mark.parametrize("fmt", ["onnx", "safetensors"])
def test_prune_and_quantize_both_orders_match_written_file(tmp_path: Path, samples: Path,
                                                           stages: list[str], fmt: str) -> None:
    src, out, dense = samples / f"mlp.{fmt}", tmp_path / f"o.{fmt}", tmp_path / f"d.{fmt}"
    result = run_cli(["compress", src, "-o", out, *stages, "--report", tmp_path / "r.json"])
    assert result.exit_code == 0, result.output
    assert run_cli(["decompress", out, "-o", dense]).exit_code == 0
    report = json.loads((tmp_path / "r.json").read_text())
    original, restored = open_model(src), open_model(dense)
    for row in report["tensors"]:
        array = restored.read(row["name"])
        assert np.count_nonzero(array == 0) >= array.size // 2
        stats = compare(original.read(row["name"]), array)
        assert stats.rel_l2 == pytest.approx(row["rel_error"], rel=1e-6)
        assert stats.sqnr_db == pytest.approx(row["sqnr_db"], rel=1e-6)
        # ONNX: 8-bit groups chosen per tensor from the values, here the longest allowed
        # (K=64 -> 16, K=256 -> 64), with 8-bit scale codes.
        expected = {"fc1.weight": "int8 g16 sym s8", "fc2.weight": "int8 g64 sym s8"}
        assert row["encoding"] == "50% sparse + " + (
            expected[row["name"]] if fmt == "onnx" else "int8 ch sym")


def test_json_format_on_stdout(tmp_path: Path, samples: Path) -> None:
    result = run_cli(["compress", samples / "cnn.safetensors", "-o", tmp_path / "c.safetensors",
                      "--format", "json", "quantize"])
    assert result.exit_code == 0
    data = json.loads(result.stdout)
    assert data["totals"]["file_bytes_after"] == (tmp_path / "c.safetensors").stat().st_size
    assert data["recipe"]["stages"][0]["id"] == "quantize"


def test_options_after_stages_are_group_options(tmp_path: Path, samples: Path) -> None:
    result = run_cli(["compress", samples / "mlp.onnx", "quantize", "--bits", "8", "-o",
                      tmp_path / "a.onnx", "--quiet"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "a.onnx").exists() and result.stdout == ""


def _bad(result, message: str, code: int) -> None:
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit)  # no traceback, just an exit
    assert "Traceback" not in result.output
    assert message in result.output


@pytest.fixture
def bad_inputs(tmp_path: Path, samples: Path) -> dict[str, Path]:
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n")
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes((samples / "mlp.safetensors").read_bytes()[:5000])
    return {"missing": tmp_path / "missing.onnx", "empty": empty, "text": text,
            "truncated": truncated}


@pytest.mark.parametrize("case, message", [
    ("missing", "missing.onnx: no such file"),
    ("empty", "empty.onnx: file is empty"),
    ("text", "notes.onnx: not a valid ONNX model"),
    ("truncated", "cut.safetensors: truncated safetensors file: tensor"),
])
def test_bad_model_files_fail_with_one_line(tmp_path: Path, bad_inputs, case: str,
                                            message: str) -> None:
    src = bad_inputs[case]
    before = sha256(src) if src.exists() else None
    out = tmp_path / ("o" + src.suffix)
    result = run_cli(["compress", src, "-o", out, "quantize", "--bits", "8"])
    _bad(result, message, 1)
    assert len(result.output.strip().splitlines()) == 1
    assert not out.exists()
    assert list(tmp_path.glob(".*modelpress-tmp")) == []
    if before:
        assert sha256(src) == before


@pytest.mark.parametrize("stages, message", [
    (["quantize", "--bits", "1"], "Invalid value for '--bits': 1 is not in the range 2<=x<=8."),
    (["prune", "--sparsity", "1.5"], "Invalid value for '--sparsity': 1.5 is not in the range"),
    (["quantize", "--granularity", "channel", "--group-size", "32"],
     "quantize: --group-size applies only to --granularity group, not channel"),
    (["quantize", "--bogus"], "No such option '--bogus'"),
    (["prune", "--pattern", "3:2"],
     "prune: --pattern 3:2 keeps N of every M weights, so it needs 0 < N < M (e.g. 2:4)"),
    (["prune", "--pattern", "2-4"], "prune: --pattern must be 'unstructured' or N:M such as 2:4"),
    (["prune", "--pattern", "2:4", "--sparsity", "0.3"], "prune: --sparsity 0.3 contradicts"),
    (["lowrank", "--rank-ratio", "0"],
     "Invalid value for '--rank-ratio': 0.0 is not in the range 0.0<x<=1.0."),
    (["lowrank"], "lowrank: give exactly one of --rank, --rank-ratio or --energy"),
    (["lowrank", "--rank", "4", "--energy", "0.9"], "(got --rank, --energy)"),
    (["cluster", "--clusters", "1"],
     "Invalid value for '--clusters': 1 is not in the range 2<=x<=256."),
    (["cluster", "--bits", "4", "--clusters", "10"], "cluster: --clusters 10 contradicts --bits 4"),
    (["cast", "--dtype", "int8"], "Invalid value for '--dtype': 'int8' is not one of 'fp16', "
                                  "'bf16', 'fp8-e4m3', 'fp8-e5m2'."),
    (["cast", "--dtype", "fp8-e4m3", "--scale", "none"], "cast: --dtype fp8-e4m3 needs --scale"),
    ([], "no stages given"),
])
def test_bad_options_exit_2_before_reading(tmp_path: Path, stages: list[str], message: str) -> None:
    result = run_cli(["compress", tmp_path / "absent.onnx", "-o", tmp_path / "o.onnx", *stages])
    _bad(result, message, 2)
    assert not (tmp_path / "o.onnx").exists()


def test_output_equal_to_input_is_refused(tmp_path: Path, samples: Path) -> None:
    src = tmp_path / "m.onnx"
    src.write_bytes((samples / "mlp.onnx").read_bytes())
    before = sha256(src)
    link = tmp_path / "link.onnx"
    link.symlink_to(src)
    for out in (src, link):
        result = run_cli(["compress", src, "-o", out, "quantize"])
        _bad(result, "output is the input file", 1)
    assert sha256(src) == before


def test_format_mismatch_refused(tmp_path: Path, samples: Path) -> None:
    result = run_cli(["compress", samples / "mlp.onnx", "-o", tmp_path / "x.safetensors",
                      "quantize"])
    _bad(result, "output must be a .onnx file like the input", 1)


def test_already_compressed_input_refused(tmp_path: Path, samples: Path) -> None:
    assert run_cli(["compress", samples / "mlp.onnx", "-o", tmp_path / "a.onnx",
                    "quantize"]).exit_code == 0
    result = run_cli(["compress", tmp_path / "a.onnx", "-o", tmp_path / "b.onnx", "quantize"])
    _bad(result, "already compressed by modelpress", 1)


def test_every_command_is_documented_with_examples() -> None:
    runner = CliRunner()
    for args in (["--help"], ["compress", "--help"], ["inspect", "--help"],
                 ["decompress", "--help"]):
        result = runner.invoke(cli, args)
        assert result.exit_code == 0, args
        assert "Usage:" in result.output
        assert "Examples:" in result.output, args
    stage_options = {"quantize": "--group-size", "prune": "--pattern", "cast": "--dtype",
                     "lowrank": "--rank-ratio", "cluster": "--per-channel"}
    for stage, option in stage_options.items():
        # Stage help comes after other stages too, and shows that stage's own options.
        for args in (["compress", stage, "--help"], ["compress", "m.onnx", "prune", stage, "-h"]):
            result = runner.invoke(cli, args)
            assert result.exit_code == 0, args
            assert result.output.startswith("Usage: ") and f" compress MODEL... {stage} [OPTIONS]" \
                in result.output.splitlines()[0], args
            assert option in result.output and "[default: (" not in result.output, args
        assert f"{stage} " in runner.invoke(cli, ["compress", "--help"]).output


def test_version() -> None:
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0 and result.output.startswith("modelpress, version ")


def test_inspect_shows_encodings(tmp_path: Path, samples: Path) -> None:
    out = tmp_path / "t.safetensors"
    assert run_cli(["compress", samples / "transformer.safetensors", "-o", out,
                    "prune", "--sparsity", "0.5"]).exit_code == 0
    result = run_cli(["inspect", out, "--format", "json"])
    assert result.exit_code == 0
    rows = {r["name"]: r for r in json.loads(result.stdout)["tensors"]}
    assert rows["lm_head.weight"]["encoding"] == "50% sparse"
    assert rows["lm_head.weight"]["zero_fraction"] == 0.5
    assert rows["ln_f.weight"]["encoding"] == "fp32"
    table = run_cli(["inspect", samples / "cnn.onnx"])
    assert table.exit_code == 0 and "conv2.weight" in table.stdout


def test_root_help_lists_each_command_with_its_own_first_line():
    # `modelpress --help` shows cli/entry.py's table without loading the commands: it must
    # say what each command's own help says.
    from modelpress.cli.entry import COMMANDS
    for name, entry in COMMANDS.items():
        command = cli.get_command(click.Context(cli), name)
        assert command.help.strip().splitlines()[0] == entry.short_help, name
    assert sorted(COMMANDS) == ["compress", "decompress", "inspect", "sweep"]
