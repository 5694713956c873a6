"""`modelpress sweep`: settings side by side, the Pareto front, plots and user recipes."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from modelpress import REGISTRY
from modelpress.app.sweep import DEFAULT_SETTINGS, Setting, sweep

from conftest import run_cli, sha256
from mdtables import tables

REQUIRED = {"int8 channel", "int4 g128", "int4 g32 mse", "fp16", "fp8 e4m3", "prune 50%",
            "prune 2:4 + int4", "lowrank 0.5", "lowrank 0.25", "cluster 4-bit", "cluster 6-bit"}
# Settings whose stages and options exist on every build since 0.1.
ALWAYS = ["int8 channel", "int4 g128", "int4 g32 mse", "prune 50%"]


def test_default_settings_cover_every_technique() -> None:
    names = [s.name for s in DEFAULT_SETTINGS]
    assert len(names) >= 10 and len(set(names)) == len(names)
    assert REQUIRED <= set(names)
    for setting in DEFAULT_SETTINGS:
        why = setting.unavailable()
        if why is None:
            ids = [stage.id for stage in setting.recipe().stages]
            assert ids == [stage["id"] for stage in setting.stages]
        else:
            assert why.startswith(("stage '", *REGISTRY)), why


def _dominates(a: dict, b: dict, metric: str) -> bool:
    return (a["file_bytes"] <= b["file_bytes"] and a[metric] <= b[metric]
            and (a["file_bytes"] < b["file_bytes"] or a[metric] < b[metric]))


@pytest.mark.parametrize("model", ["mlp", "cnn", "transformer"])
def test_sweep_sample_models(tmp_path: Path, samples: Path, model: str) -> None:
    result = run_cli(["sweep", samples / f"{model}.onnx", "--format", "json",
                      "--report", tmp_path / "s.json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data == json.loads((tmp_path / "s.json").read_text())
    rows = {r["name"]: r for r in data["settings"]}
    assert list(rows) == [s.name for s in DEFAULT_SETTINGS]
    ran = [r for r in rows.values() if r["status"] == "ok"]
    available = [s.name for s in DEFAULT_SETTINGS if s.unavailable() is None]
    assert [r["name"] for r in ran] == available  # every available setting ran, none failed
    assert set(ALWAYS) <= set(available) and len(ran) >= len(ALWAYS)
    assert len(ran) == len(DEFAULT_SETTINGS) >= 11  # every technique is built in
    for row in rows.values():
        if row["status"] == "skipped":
            stage_ids = [s["id"] for s in row["recipe"]["stages"]]
            assert row["note"].startswith("skipped: ")
            assert any(i not in REGISTRY or i in row["note"] for i in stage_ids), row["note"]
    assert data["front_metric"] == "output error"
    assert data["input_sha256"] == sha256(samples / f"{model}.onnx")
    assert data["versions"]["onnxruntime"] is not None
    source = (samples / f"{model}.onnx").stat().st_size
    for row in ran:
        assert row["file_bytes"] > 0 and row["ratio"] == pytest.approx(row["file_bytes"] / source)
        assert row["output_error"] >= 0 and row["latency_ratio"] > 0
        assert (row["output_error"] > 0) is (row["tensors_changed"] > 0)
    assert rows["int8 channel"]["ratio"] < 0.35 and rows["int4 g128"]["ratio"] < 0.25
    assert 0 < rows["int8 channel"]["output_error"] < rows["int4 g128"]["output_error"] < 1
    candidates = [r for r in ran if r["tensors_changed"]]
    assert any(r["on_front"] for r in candidates)
    for row in ran:  # the front is exactly the non-dominated settings that change something
        dominated = any(_dominates(other, row, "output_error")
                        for other in candidates if other is not row)
        assert row["on_front"] is (row["tensors_changed"] > 0 and not dominated)


def test_bits_per_weight_counts_scales(tmp_path: Path, samples: Path) -> None:
    settings = [Setting("int8", ({"id": "quantize", "bits": 8, "granularity": "channel"},))]
    report = sweep(samples / "mlp.onnx", settings, evaluation=None)
    (row,) = report.rows
    # fc1 [256, 64] + fc2 [128, 256] (Gemm transB: out-channel axis 0): one fp32 scale per row.
    elements, scales = 256 * 64 + 128 * 256, 256 + 128
    assert row.elements == elements and row.tensors == 2
    # ONNX stores each per-channel scale as an 8-bit code on a per-tensor grid of
    # 16 + 16 float32 values.
    assert row.bits_per_weight == pytest.approx(8 * (elements + scales + 2 * 32 * 4) / elements)
    assert row.evaluation is None


def test_sweep_table_and_markdown(samples: Path) -> None:
    args = ["sweep", samples / "mlp.onnx", "--inputs", samples / "mlp_test_inputs.npz",
            "--labels", samples / "mlp_test_labels.npy"]
    table = run_cli(args)
    assert table.exit_code == 0, table.output
    assert "setting" in table.stdout and "front" in table.stdout and "accuracy" in table.stdout
    assert "note: accuracy of the original: 91.70%" in table.stdout
    markdown = run_cli(args + ["--format", "markdown"])
    assert markdown.exit_code == 0
    (found,) = tables(markdown.stdout)
    assert found[0] == ["setting", "size", "ratio", "bits/weight", "weight error",
                        "output error", "top-1 agree", "accuracy", "latency", "front"]
    rows = {r[0]: r for r in found[1:]}
    assert list(rows) == [s.name for s in DEFAULT_SETTINGS]
    assert "yes" in {r[-1] for r in rows.values()}
    assert rows["int8 channel"][7] in ("91.60%", "91.70%", "91.80%")


def test_sweep_safetensors_uses_weight_error(samples: Path) -> None:
    result = run_cli(["sweep", samples / "cnn.safetensors", "--format", "json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["front_metric"] == "weight error"
    assert data["evaluation"]["status"] == "not-applicable"
    ran = [r for r in data["settings"] if r["status"] == "ok"]
    assert all(r["output_error"] is None for r in ran)
    assert all(r["weight_error"] > 0 for r in ran if r["tensors_changed"])
    assert any(r["on_front"] for r in ran)
    text = run_cli(["sweep", samples / "cnn.safetensors"]).stdout
    assert "output error needs the ONNX form" in " ".join(text.split())


def test_user_recipes(tmp_path: Path, samples: Path) -> None:
    recipes = tmp_path / "mine.yaml"
    recipes.write_text("- name: eight\n  stages: [{id: quantize, bits: 8}]\n"
                       "- name: sparse then eight\n"
                       "  stages: [{id: prune, sparsity: 0.3}, {id: quantize, bits: 8}]\n")
    result = run_cli(["sweep", samples / "mlp.onnx", "--recipes", recipes, "--format", "json",
                      "--no-eval"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [r["name"] for r in data["settings"]] == ["eight", "sparse then eight"]
    assert all(r["status"] == "ok" for r in data["settings"])
    stages = data["settings"][1]["recipe"]["stages"]
    assert [s["id"] for s in stages] == ["prune", "quantize"] and stages[0]["sparsity"] == 0.3
    assert data["front_metric"] == "weight error"  # --no-eval: nothing was run


@pytest.mark.parametrize("text, message", [
    ("- stages: [{id: quantize}]\n", "recipe 1 needs a 'name'"),
    ("- {name: a, stages: [{id: quantize}]}\n- {name: a, stages: [{id: prune}]}\n",
     "recipe name 'a' is used twice"),
    ("- {name: a, stages: [{id: squash}]}\n", "unknown stage 'squash'"),
    ("recipes: 3\n", "expected a list of recipes"),
])
def test_bad_recipes_file_is_a_usage_error(tmp_path: Path, samples: Path, text: str,
                                           message: str) -> None:
    recipes = tmp_path / "r.yaml"
    recipes.write_text(text)
    result = run_cli(["sweep", samples / "mlp.onnx", "--recipes", recipes])
    assert result.exit_code == 2, result.output
    assert message in result.output


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR" and length == 13
    return struct.unpack(">II", data[16:24])


def test_plot_writes_a_png(tmp_path: Path, samples: Path) -> None:
    pytest.importorskip("matplotlib")
    plot = tmp_path / "sweep.png"
    result = run_cli(["sweep", samples / "transformer.onnx", "--plot", plot])
    assert result.exit_code == 0, result.output
    data = plot.read_bytes()
    width, height = _png_size(data)
    assert width >= 400 and height >= 300 and len(data) > 10_000
    assert data.endswith(b"IEND\xaeB`\x82")
    from matplotlib.image import imread
    pixels = imread(str(plot))
    # Red Pareto-front marks are drawn: some pixels are strongly red.
    red = (pixels[..., 0] > 0.7) & (pixels[..., 1] < 0.35) & (pixels[..., 2] < 0.35)
    assert np.count_nonzero(red) > 50


def test_plot_without_matplotlib_says_how_to_install(tmp_path: Path, samples: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import modelpress.cli.sweep as cli_sweep
    real = cli_sweep.importlib.util.find_spec
    monkeypatch.setattr(cli_sweep.importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    result = run_cli(["sweep", samples / "mlp.onnx", "--plot", tmp_path / "p.png"])
    assert result.exit_code == 1
    assert "--plot needs matplotlib, which is not installed: pip install 'modelpress[plot]'" in \
        result.output
    assert not (tmp_path / "p.png").exists()


def test_sweep_help_has_examples_and_definitions() -> None:
    result = run_cli(["sweep", "--help"])
    assert result.exit_code == 0
    text = " ".join(result.output.split())
    assert "Examples:" in text and "modelpress sweep sample_models/mlp.onnx" in text
    assert "bytes written for the changed tensors x 8 / their element count" in text
