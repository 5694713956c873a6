"""Recipes: the command line, a file and the Python API mean the same thing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from modelpress import (REGISTRY, stage_from_config, Cast, Cluster, Factorize, Prune, Quantize, Recipe, RecipeError, Stage)

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
    (["cast"], [Cast()]),
    (["cast", "--dtype", "bf16", "--exclude", "lm_head*"], [Cast(dtype="bf16", exclude=("lm_head*",))]),
    (["cast", "--dtype", "fp8-e4m3"], [Cast(dtype="fp8-e4m3", scale="channel")]),
    (["cast", "--dtype", "fp8-e5m2", "--scale", "tensor"], [Cast(dtype="fp8-e5m2", scale="tensor")]),
    (["prune", "--pattern", "2:4"], [Prune(pattern="2:4", sparsity=0.5)]),
    (["prune", "--sparsity", "0.7", "--scope", "global"], [Prune(sparsity=0.7, scope="global")]),
    (["lowrank", "--rank", "8"], [Factorize(rank=8)]),
    (["lowrank", "--rank-ratio", "0.25", "quantize", "--bits", "4"],
     [Factorize(rank_ratio=0.25), Quantize(bits=4)]),
    (["lowrank", "--energy", "0.9", "--include", "fc*"], [Factorize(energy=0.9, include=("fc*",))]),
    (["cluster"], [Cluster(bits=4)]),
    (["cluster", "--clusters", "10", "--per-channel"], [Cluster(clusters=10, per_channel=True)]),
    (["prune", "--pattern", "4:8", "cluster", "--bits", "3"],
     [Prune(pattern="4:8"), Cluster(bits=3)]),
]


def test_every_stage_has_a_round_trip_case() -> None:
    covered = {stage.id for _, stages in CASES for stage in stages}
    assert covered == set(REGISTRY)


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
    for stage in (Quantize(bits=3, scheme="asym"), Prune(sparsity=0.25, include=("a*",)),
                  Prune(pattern="2:4"), Cast(dtype="fp8-e5m2"), Factorize(rank_ratio=0.5),
                  Cluster(clusters=7, per_channel=True), Cluster(bits=2)):
        config = stage.get_config()
        assert json.loads(json.dumps(config)) == config
        assert stage_from_config(config) == stage
        assert repr(stage_from_config(config)) == repr(stage)


@pytest.mark.parametrize("config, message", [
    ({"version": 1, "stages": [{"id": "quantise"}]},
     "stage 1: unknown stage 'quantise'; known stages: cast, cluster, lowrank, prune, quantize"),
    ({"version": 1, "stages": [{"id": "quantize", "bitz": 4}]},
     "stage 1: quantize: unknown option 'bitz'"),
    ({"version": 2, "stages": [{"id": "prune"}]}, "version 2 is not supported"),
    ({"stages": []}, "'stages' must be a non-empty list"),
    ({"version": 1, "stages": [{"id": "prune"}], "extra": 1}, "unknown key 'extra'"),
    ({"version": 1, "stages": [{"id": "cluster", "bitz": 4}]},
     "stage 1: cluster: unknown option 'bitz'; allowed: bits, clusters, exclude, include, "
     "per_channel"),
    ({"version": 1, "stages": [{"id": "prune"}, {"id": "lowrank", "rank_ratio": 0}]},
     "stage 2: lowrank: --rank-ratio must be > 0.0, got 0.0"),
    ({"version": 1, "stages": [{"id": "prune", "pattern": "3:2"}]},
     "stage 1: prune: --pattern 3:2 keeps N of every M weights, so it needs 0 < N < M"),
    ({"version": 1, "stages": [{"id": "cast", "dtype": "int8"}]},
     "stage 1: cast: --dtype must be one of fp16, bf16, fp8-e4m3, fp8-e5m2, got 'int8'"),
    ({"version": 1, "stages": [{"id": "cluster", "clusters": 1}]},
     "stage 1: cluster: --clusters must be >= 2, got 1"),
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


@pytest.mark.parametrize("recipe, message", [
    ("version: 1\nstages:\n  - id: palettize\n", "r.yaml: stage 1: unknown stage 'palettize'"),
    ("version: 1\nstages:\n  - {id: lowrank, rank_ratio: 0.5, power: 2}\n",
     "r.yaml: stage 1: lowrank: unknown option 'power'"),
    ("version: 1\nstages:\n  - {id: prune, pattern: '3:2'}\n", "prune: --pattern 3:2"),
])
def test_bad_recipe_files_for_new_stages_exit_2(tmp_path: Path, samples: Path, recipe: str,
                                                message: str) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(recipe)
    result = run_cli(["compress", samples / "mlp.onnx", "-o", tmp_path / "o.onnx",
                      "--recipe", path])
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (tmp_path / "o.onnx").exists()
