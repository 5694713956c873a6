"""Usage errors of `compress` (issue 16, item 6): exact exit codes, before any model is read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from modelpress.core.order import order_problem

from conftest import run_cli
from test_compose import EXPECTED, STAGES

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"


def last_line(output: str) -> str:
    return output.strip().splitlines()[-1]


def test_a_mistyped_first_stage_gets_did_you_mean(tmp_path: Path) -> None:
    result = run_cli(["compress", SAMPLES / "mlp.onnx", "-o", tmp_path / "o.onnx",
                      "quantise", "--bits", "4"])
    assert result.exit_code == 2
    assert last_line(result.output) == "Error: No such command 'quantise'. Did you mean 'quantize'?"
    # The same words as for a mistyped later stage (click's own).
    result = run_cli(["compress", SAMPLES / "mlp.onnx", "-o", tmp_path / "o.onnx",
                      "prune", "quantise", "--bits", "4"])
    assert result.exit_code == 2
    assert last_line(result.output) == "Error: No such command 'quantise'. Did you mean 'quantize'?"
    assert not (tmp_path / "o.onnx").exists()


def test_a_file_named_like_a_stage_is_still_a_model(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prun").write_bytes((SAMPLES / "mlp.onnx").read_bytes())
    result = run_cli(["compress", "prun", "-o", "o.onnx", "quantize"])
    assert "Did you mean" not in result.output
    result = run_cli(["compress", "prune.onnx", "-o", "o.onnx", "quantize"])
    assert "Did you mean" not in result.output and "prune.onnx" in result.output


def test_an_impossible_order_exits_2_before_reading_the_model(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model.onnx"
    result = run_cli(["compress", missing, "-o", tmp_path / "o.onnx",
                      "cluster", "--bits", "4", "prune"])
    assert result.exit_code == 2
    assert last_line(result.output) == (
        "Error: prune cannot follow a stage that made it palette 16 (4-bit); put prune first: "
        "prune -> cluster gives the pruned zeros an exact codebook entry")
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"version": 1, "stages": [{"id": "quantize"}, {"id": "cast"}]}))
    result = run_cli(["compress", missing, "-o", tmp_path / "o.onnx", "--recipe", recipe])
    assert result.exit_code == 2
    assert "cast cannot follow a stage that made it int8" in last_line(result.output)


@pytest.mark.parametrize("first, then", sorted(EXPECTED))
def test_the_static_check_agrees_with_the_stages(first: str, then: str) -> None:
    problem = order_problem([STAGES[first], STAGES[then]])
    if EXPECTED[(first, then)] is None:
        assert problem is None
    else:
        assert problem is not None and problem.startswith(f"{then} cannot follow a stage that made it ")
        assert EXPECTED[(first, then)] in problem


def test_orders_across_three_stages() -> None:
    prune, quantize, cast, lowrank = (STAGES[s] for s in ("prune", "quantize", "cast", "lowrank"))
    assert order_problem([prune, quantize, prune]) is None
    assert order_problem([prune, quantize, cast]).startswith("cast cannot follow a stage that made it int4")
    assert order_problem([lowrank, quantize, prune]).startswith("prune cannot follow a stage that made it rank")
    nm = type(prune)(pattern="2:4")
    assert order_problem([nm, quantize]) is None
    assert order_problem([nm, prune]).startswith("prune cannot follow a stage that made it 2:4")
    # Different selections may never meet: left to the run, tensor by tensor.
    assert order_problem([STAGES["cluster"], type(prune)(include=("fc1*",))]) is None


def test_a_pattern_that_matches_nothing_warns_or_fails_with_strict(tmp_path: Path) -> None:
    out = tmp_path / "o.onnx"
    args = ["compress", SAMPLES / "mlp.onnx", "-o", out, "--no-eval", "--format", "json",
            "quantize", "--include", "nomatch*", "--exclude", "fc1*"]
    result = run_cli(args)
    assert result.exit_code == 0, result.output
    notes = json.loads(result.output)["notes"]
    assert "warning: quantize --include 'nomatch*' matches no tensor; that option changed " \
           "nothing" in notes
    assert not any("--exclude" in n for n in notes)
    out.unlink()
    result = run_cli([*args[:5], "--strict", *args[5:]])
    assert result.exit_code == 2
    assert last_line(result.output) == (
        f"Error: {SAMPLES / 'mlp.onnx'}: quantize --include 'nomatch*' matches no tensor (see "
        "the model's tensors with `modelpress inspect`; without --strict this is a warning)")
    assert not out.exists()


def test_include_narrows_the_weight_like_tensors_unless_take_all_named(tmp_path: Path) -> None:
    from modelpress.formats import open_model
    src = SAMPLES / "transformer.safetensors"
    names = list(open_model(src).tensors)
    biases = [n for n in names if n.endswith(".bias") and "layers.0." in n]
    assert biases   # 1-D: not weight-like
    out = tmp_path / "o.safetensors"
    result = run_cli(["compress", src, "-o", out, "--format", "json", "quantize",
                      "--include", "layers.0.*"])
    assert result.exit_code == 0, result.output
    changed = [t["name"] for t in json.loads(result.output)["tensors"]]
    assert changed and all(n.endswith(".weight") for n in changed)
    assert not set(changed) & set(biases)
    out.unlink()
    result = run_cli(["compress", src, "-o", out, "--format", "json", "quantize",
                      "--include", "layers.0.*", "--take-all-named"])
    assert result.exit_code == 0, result.output
    changed = [t["name"] for t in json.loads(result.output)["tensors"]]
    assert set(biases) <= set(changed)
    out.unlink()
    result = run_cli(["compress", src, "-o", out, "--format", "json", "quantize",
                      "--include", "*.bias"])
    assert result.exit_code == 0, result.output
    (note,) = [n for n in json.loads(result.output)["notes"] if n.startswith("warning")]
    assert note.startswith("warning: quantize --include '*.bias' matches no weight-like tensor "
                           "(it names '")
    assert note.endswith("' and others; --take-all-named changes those too); that option "
                         "changed nothing")
