"""Reports for CI (issue 16, item 5): Markdown that fits a job summary."""

from __future__ import annotations

import json
from pathlib import Path

from modelpress import Quantize, Recipe, compress
from modelpress.cli.render import human_bytes, markdown_report

from conftest import run_cli
from mdtables import tables

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"


def test_markdown_collapses_the_smaller_tensors(tmp_path: Path) -> None:
    report = compress(SAMPLES / "transformer.safetensors", tmp_path / "o.safetensors",
                      Recipe([Quantize(bits=8)]))
    assert len(report.rows) == 9
    (table,) = tables(markdown_report(report, max_rows=3))
    body = table[1:]
    largest = sorted(report.rows, key=lambda r: -r.bytes_before)[:3]
    shown = [r for r in report.rows if r in largest]
    assert [row[0] for row in body[:3]] == [f"`{r.name}`" for r in shown]
    assert body[0][3:5] == [human_bytes(shown[0].bytes_before), human_bytes(shown[0].bytes_after)]
    rest = [r for r in report.rows if r not in largest]
    assert body[3][0] == "6 smaller tensors (every row: `--format json`)"
    assert body[3][3:5] == [human_bytes(sum(r.bytes_before for r in rest)),
                            human_bytes(sum(r.bytes_after for r in rest))]
    assert body[4][0] == "**total (file on disk)**"
    assert body[4][3] == human_bytes(report.file_bytes_before)
    assert len(body) == 5
    (table,) = tables(markdown_report(report))  # 9 rows fit under the default limit
    assert len(table) == 1 + 9 + 1


def test_batch_markdown_uses_human_sizes(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "m.safetensors").write_bytes((SAMPLES / "mlp.safetensors").read_bytes())
    result = run_cli(["compress", tmp_path / "in", "-o", tmp_path / "out", "--jobs", "1",
                      "--format", "markdown", "quantize"])
    assert result.exit_code == 0, result.output
    (table,) = tables(result.stdout)
    size = (SAMPLES / "mlp.safetensors").stat().st_size
    assert table[1][2] == human_bytes(size) and table[-1][2] == human_bytes(size)


def test_json_carries_every_option_as_applied(tmp_path: Path) -> None:
    result = run_cli(["compress", SAMPLES / "transformer.safetensors", "-o",
                      tmp_path / "o.safetensors", "--format", "json", "quantize", "--bits", "4"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    (given,) = report["recipe"]["stages"]
    assert given["scheme"] is None and given["group_size"] is None   # as the user gave it
    (applied,) = report["recipe_applied"]["stages"]
    # zero_bits and backup_bits stay None: symmetric codes have no zero point, and
    # safetensors gets no backup precision unless asked; sequential applies to gptq only.
    assert applied == {"id": "quantize", "bits": 4, "scheme": "sym", "granularity": "group",
                       "group_size": 128, "method": "mse", "scale_bits": 0, "zero_bits": None,
                       "super_block": 0, "backup_bits": None, "all_layers": False,
                       "activations": None, "sequential": False}
    for tensor in report["tensors"]:
        assert tensor["stages"] == [applied]


def test_options_that_differ_by_tensor_are_given_by_tensor(tmp_path: Path) -> None:
    report = compress(SAMPLES / "transformer.onnx", tmp_path / "o.onnx",
                      Recipe([Quantize(bits=4)])).as_dict()
    (applied,) = report["recipe_applied"]["stages"]
    assert applied["scheme"] == "asym" and applied["granularity"] == "group"
    backup = applied["backup_bits"]
    assert isinstance(backup, dict) and set(backup) == {t["name"] for t in report["tensors"]}
    assert backup["embed_tokens.weight"] == 5 and backup["layers.0.mlp.fc1.weight"] is None
