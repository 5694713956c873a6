"""Recipes: the command line, a file and the Python API mean the same thing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from compress_core import Prune, Quantize, Recipe, RecipeError, Stage

from conftest import run_cli

CASES = [
    (["quantize", "--bits", "4", "--group-size", "32", "--scheme", "asym"],
     [Quantize(bits=4, group_size=32, scheme="asym")]),
    (["quantize", "--bits", "8", "--granularity", "tensor", "--method", "mse"],
     [Quantize(bits=8, granularity="tensor", method="mse")]),
    (["prune", "--sparsity", "0.3", "--exclude", "lm_head*", "--exclude", "emb*"],
     [Prune(sparsity=0.3, exclude=("lm_head*", "emb*"))]),
    (["prune", "quantize", "--bits", "6", "--include", "fc*"],
     [Prune(), Quantize(bits=6, include=("fc*",))]),
]


@pytest.mark.parametrize("argv, stages", CASES)
def test_cli_file_and_api_recipes_are_equal(tmp_path: Path, argv: list[str], stages) -> None:
    api = Recipe(stages)
    printed = run_cli(["compress", "m.onnx", "-o", "o.onnx", "--print-recipe", *argv])
    assert printed.exit_code == 0, printed.output
    from_cli = Recipe.from_config(yaml.safe_load(printed.stdout))
    (tmp_path / "r.yaml").write_text(printed.stdout)
    (tmp_path / "r.json").write_text(json.dumps(api.get_config()))
    assert from_cli == api
    assert Recipe.load(tmp_path / "r.yaml") == api
    assert Recipe.load(tmp_path / "r.json") == api


def test_stage_config_round_trip() -> None:
    for stage in (Quantize(bits=3, scheme="asym"), Prune(sparsity=0.25, include=("a*",))):
        config = stage.get_config()
        assert json.loads(json.dumps(config)) == config
        assert Stage.from_config(config) == stage
        assert repr(Stage.from_config(config)) == repr(stage)


@pytest.mark.parametrize("config, message", [
    ({"version": 1, "stages": [{"id": "quantise"}]},
     "stage 1: unknown stage 'quantise'; known stages: cast, cluster, lowrank, prune, quantize"),
    ({"version": 1, "stages": [{"id": "quantize", "bitz": 4}]},
     "stage 1: quantize: unknown option 'bitz'"),
    ({"version": 2, "stages": [{"id": "prune"}]}, "version 2 is not supported"),
    ({"stages": []}, "'stages' must be a non-empty list"),
    ({"version": 1, "stages": [{"id": "prune"}], "extra": 1}, "unknown key 'extra'"),
    ([{"id": "prune"}], "expected a mapping with 'version' and 'stages'"),
])
def test_bad_recipes_name_stage_and_key(config, message: str) -> None:
    with pytest.raises(RecipeError) as exc:
        Recipe.from_config(config)
    assert message in str(exc.value)


def test_bad_recipe_file_exits_2(tmp_path: Path, samples: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("version: 1\nstages:\n  - id: quantize\n    bitz: 4\n")
    result = run_cli(["compress", samples / "mlp.onnx", "-o", tmp_path / "o.onnx",
                      "--recipe", path])
    assert result.exit_code == 2
    assert "r.yaml: stage 1: quantize: unknown option 'bitz'" in result.output
    assert not (tmp_path / "o.onnx").exists()


def test_recipe_file_compresses_like_command_line(tmp_path: Path, samples: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("version: 1\nstages:\n  - {id: prune, sparsity: 0.5}\n"
                    "  - {id: quantize, bits: 8}\n")
    a = run_cli(["compress", samples / "mlp.onnx", "-o", tmp_path / "a.onnx", "--recipe", path])
    b = run_cli(["compress", samples / "mlp.onnx", "-o", tmp_path / "b.onnx",
                 "prune", "--sparsity", "0.5", "quantize", "--bits", "8"])
    assert a.exit_code == b.exit_code == 0
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_stages_and_recipe_together_refused(tmp_path: Path) -> None:
    result = run_cli(["compress", "m.onnx", "-o", "o.onnx", "--recipe", "r.yaml", "quantize"])
    assert result.exit_code == 2
    assert "not both" in result.output
