"""A size target on a Hugging Face model directory: mixed 4/8-bit weights in
compressed-tensors config groups that transformers loads (issue 17, item 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import run_cli
from test_hf_directory import _load, model_dir  # noqa: F401  (the tiny BERT fixture)


def test_a_size_target_writes_config_groups_transformers_loads(
        model_dir: Path, tmp_path: Path) -> None:  # noqa: F811
    torch = pytest.importorskip("torch")
    out, printed, again = tmp_path / "out", tmp_path / "r.yaml", tmp_path / "again"
    weights = model_dir / "model.safetensors"
    result = run_cli(["compress", model_dir, "-o", out, "--jobs", "1", "--target-size", "36%",
                      "quantize", "--bits", "2-8"])
    assert result.exit_code == 0, result.output
    assert "note: target --target-size" in result.output
    assert (out / "model.safetensors").stat().st_size <= int(0.36 * weights.stat().st_size)
    groups = json.loads((out / "config.json").read_text())["quantization_config"]["config_groups"]
    widths = sorted({g["weights"]["num_bits"] for g in groups.values()})
    assert widths == [4, 8]  # mixed, and only the widths the layout holds
    compressed, info = _load(out)
    assert not info["unexpected_keys"] and not info["missing_keys"]
    assert not info["mismatched_keys"]
    original, _ = _load(model_dir)
    ids = torch.randint(5, 512, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = compressed(input_ids=ids).last_hidden_state.ravel()
        b = original(input_ids=ids).last_hidden_state.ravel()
    assert float(torch.nn.functional.cosine_similarity(a, b, dim=0)) > 0.99

    result = run_cli(["compress", model_dir, "-o", out, "--target-size", "36%",
                      "--print-recipe", "quantize", "--bits", "2-8"])
    assert result.exit_code == 0, result.output
    printed.write_text(result.output)
    result = run_cli(["compress", model_dir, "-o", again, "--jobs", "1", "--recipe", printed])
    assert result.exit_code == 0, result.output
    assert (again / "model.safetensors").read_bytes() == (out / "model.safetensors").read_bytes()
    assert (again / "config.json").read_bytes() == (out / "config.json").read_bytes()


def test_widths_the_loaders_cannot_take_are_refused(model_dir: Path,  # noqa: F811
                                                    tmp_path: Path) -> None:
    result = run_cli(["compress", model_dir, "-o", tmp_path / "out", "--target-size", "36%",
                      "quantize", "--bits", "2-3"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines()[-1] == (
        "Error: quantize --bits 2/3: a Hugging Face model directory loads 4 and 8 bits "
        "(compressed-tensors); choose from them (--bits 4-8)")
