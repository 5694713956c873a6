"""Issue 15: hostile or odd inputs that once gave wrong output, a traceback or a hang."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import onnx
from onnx import TensorProto, numpy_helper

from conftest import run_cli
from corpus import external_model, save_onnx, weights


def test_external_tensor_that_also_holds_raw_data_is_refused(tmp_path: Path) -> None:
    """Item 1: modelpress compressed raw_data while onnxruntime ran the external bytes."""
    model_path = external_model(tmp_path, "w1.bin", data=weights(64, 64, seed=1).tobytes())
    model = onnx.load(str(model_path), load_external_data=False)
    model.graph.initializer[0].raw_data = weights(64, 64, seed=9).tobytes()
    save_onnx(model_path, model)
    out = tmp_path / "o.onnx"
    result = run_cli(["compress", model_path, "-o", out, "quantize", "--bits", "8"])
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines()[-1].startswith(f"Error: {model_path}: tensor 'w1'")
    assert "the model is ambiguous" in result.output
    assert not out.exists()


def test_safetensors_header_nested_deep_is_one_line(tmp_path: Path) -> None:
    """Item 5: JSON nested 100k deep ended in RecursionError."""
    from corpus import st_raw
    path = tmp_path / "m.safetensors"
    path.write_bytes(st_raw(b'{"w": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"))
    for args in (["inspect", path], ["compress", path, "-o", tmp_path / "o.safetensors",
                                     "quantize"]):
        result = run_cli(args)
        assert result.exit_code == 1, result.output
        assert result.output.strip() == (f"Error: {path}: corrupt safetensors header (JSON "
                                         "nested too deeply); the file is damaged or not "
                                         "safetensors")


def test_sharded_index_nested_deep_is_one_line(tmp_path: Path) -> None:
    index = tmp_path / "model.safetensors.index.json"
    index.write_text('{"weight_map": ' + "[" * 100_000 + "]" * 100_000 + "}")
    result = run_cli(["inspect", index])
    assert result.exit_code == 1, result.output
    assert result.output.strip() == (f"Error: {index}: not a valid safetensors index (JSON "
                                     "nested too deeply)")


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_recipe_not_utf8_is_a_usage_error(tmp_path: Path, samples: Path, suffix: str) -> None:
    """Item 9: a recipe with a non-UTF-8 byte was a UnicodeDecodeError (exit 1)."""
    recipe = tmp_path / f"r{suffix}"
    recipe.write_bytes(b"version: 1\nstages:\n  - {id: quantize, bits: 8} # \xff\n")
    result = run_cli(["compress", samples / "mlp.onnx", "-o", tmp_path / "o.onnx", "--recipe",
                      recipe])
    assert result.exit_code == 2, result.output
    assert f"Error: {recipe}: not UTF-8 text (byte 0xff at offset 49); save the recipe as " \
           "UTF-8" in result.output
    sweep = run_cli(["sweep", samples / "mlp.onnx", "--no-eval", "--recipes", recipe])
    assert sweep.exit_code == 2, sweep.output
    assert "not UTF-8 text" in sweep.output


@pytest.mark.parametrize("suffix,text", [
    (".json", '{"version": 1, "stages": [{"id": "quantize", "bits": 8, "bits": 4}]}'),
    (".yaml", "version: 1\nstages:\n  - id: quantize\n    bits: 8\n    bits: 4\n"),
    (".yaml", "version: 1\nversion: 1\nstages: [{id: quantize}]\n"),
])
def test_recipe_duplicate_key_is_refused(tmp_path: Path, samples: Path, suffix: str,
                                         text: str) -> None:
    """Item 16: a key given twice silently took the last value."""
    recipe = tmp_path / f"r{suffix}"
    recipe.write_text(text)
    out = tmp_path / "o.onnx"
    result = run_cli(["compress", samples / "mlp.onnx", "-o", out, "--recipe", recipe])
    assert result.exit_code == 2, result.output
    assert "appears twice in one mapping; keep one" in result.output
    assert not out.exists()


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_recipe_nested_deep_is_a_usage_error(tmp_path: Path, samples: Path, suffix: str) -> None:
    recipe = tmp_path / f"r{suffix}"
    recipe.write_text("[" * 100_000 + "]" * 100_000)
    result = run_cli(["compress", samples / "mlp.onnx", "-o", tmp_path / "o.onnx", "--recipe",
                      recipe])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert f"Error: {recipe}: not valid" in result.output


def test_safetensors_duplicate_tensor_name_is_refused(tmp_path: Path) -> None:
    from corpus import st_raw
    path = tmp_path / "m.safetensors"
    path.write_bytes(st_raw(b'{"w": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]},'
                            b' "w": {"dtype": "F32", "shape": [2, 8], "data_offsets": [0, 64]}}',
                            bytes(64)))
    result = run_cli(["inspect", path])
    assert result.exit_code == 1, result.output
    assert "key 'w' appears more than once" in result.output


@pytest.mark.parametrize("which", ["input", "output"])
def test_onnx_path_not_utf8_is_named(tmp_path: Path, samples: Path, which: str) -> None:
    """Item 7: a non-UTF-8 byte in an ONNX path was blamed on onnx.checker."""
    odd = tmp_path / os.fsdecode(b"m\xff.onnx")
    src, out = (odd, tmp_path / "o.onnx") if which == "input" else (samples / "mlp.onnx", odd)
    if which == "input":
        shutil.copy(samples / "mlp.onnx", odd)
    result = run_cli(["compress", src, "-o", out, "quantize"])
    assert result.exit_code == 1, result.output
    name = "file" if which == "input" else "output"
    assert result.output.strip().endswith(f"the {name} name is not valid UTF-8; onnx and "
                                          "onnxruntime cannot open such a path (rename it)")
    assert "checker" not in result.output
    assert not (tmp_path / "o.onnx").exists() and (which == "input" or not odd.exists())


def run_in_child(args: list[object]) -> list[str]:
    """The CLI run in a child process (a FIFO that blocks must not hang the test run): its
    exit code, then its output, as lines."""
    code = ("import sys; from click.testing import CliRunner; from modelpress.cli.entry import "
            "cli; r = CliRunner().invoke(cli, sys.argv[1:]); print(r.exit_code); "
            "print(r.output)")
    done = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True,
                          text=True, timeout=60)
    return (done.stdout.strip() or done.stderr.strip()).splitlines() or [""]


@pytest.mark.parametrize("suffix", [".onnx", ".safetensors"])
@pytest.mark.parametrize("command", ["compress", "inspect", "decompress"])
def test_fifo_model_is_refused_at_once(tmp_path: Path, suffix: str, command: str) -> None:
    """Item 6: an ONNX FIFO hung forever; a safetensors FIFO was called "file is empty"."""
    fifo = tmp_path / f"m{suffix}"
    os.mkfifo(fifo)
    args = {"compress": ["compress", fifo, "-o", tmp_path / f"o{suffix}", "quantize"],
            "inspect": ["inspect", fifo],
            "decompress": ["decompress", fifo, "-o", tmp_path / f"o{suffix}"]}[command]
    lines = run_in_child(args)
    assert lines[0] == "1", lines
    assert lines[-1] == (f"Error: {fifo}: not a regular file (a pipe, socket or device); give "
                         "the model file itself")


@pytest.mark.parametrize("option", ["--inputs", "--labels"])
def test_fifo_inputs_are_refused_at_once(tmp_path: Path, samples: Path, option: str) -> None:
    fifo = tmp_path / ("x.npz" if option == "--inputs" else "y.npy")
    os.mkfifo(fifo)
    inputs = fifo if option == "--inputs" else samples / "mlp_test_inputs.npz"
    args = ["compress", samples / "mlp.onnx", "-o", tmp_path / "o.onnx", "--inputs", inputs,
            *(["--labels", fifo] if option == "--labels" else []), "quantize"]
    lines = run_in_child(args)
    assert lines[0] == "1", lines
    assert lines[-1].startswith(f"Error: {fifo}: not a regular file")


def test_labels_outside_the_classes_are_refused(tmp_path: Path, samples: Path) -> None:
    """Item 16: labels outside the class range were accepted silently."""
    labels = tmp_path / "y.npy"
    count = np.load(samples / "mlp_test_labels.npy").shape[0]
    np.save(labels, np.full(count, 99, np.int64))
    out = tmp_path / "o.onnx"
    result = run_cli(["compress", samples / "mlp.onnx", "-o", out, "--inputs",
                      samples / "mlp_test_inputs.npz", "--labels", labels, "quantize"])
    assert result.exit_code == 1, result.output
    assert result.output.strip() == (f"Error: {labels}: label 99 is outside the 10 classes of "
                                     "output 'logits' (0 to 9)")
    assert not out.exists()


def test_inputs_without_samples_are_refused(tmp_path: Path, samples: Path) -> None:
    """Item 16: --inputs with 0 samples printed numpy RuntimeWarnings and "nan%"."""
    inputs = tmp_path / "x.npz"
    np.savez(inputs, input=np.zeros((0, 64), np.float32))
    result = run_cli(["compress", samples / "mlp.onnx", "-o", tmp_path / "o.onnx", "--inputs",
                      inputs, "quantize"])
    assert result.exit_code == 1, result.output
    assert "no samples; give at least one" in result.output
    assert "nan" not in result.output and "Warning" not in result.output


def test_an_output_that_changed_meaning_is_said(tmp_path: Path, samples: Path) -> None:
    """Item 1: an evaluation showing the model's meaning changed must not pass silently."""
    out = tmp_path / "o.onnx"
    result = run_cli(["compress", samples / "mlp.onnx", "-o", out, "prune", "--sparsity",
                      "0.999", "--include", "*"])
    assert result.exit_code == 0, result.output
    assert "warning: output 'logits' of the compressed model is no longer the original's " \
           "(relative error" in result.output
    ordinary = run_cli(["compress", samples / "mlp.onnx", "-o", out, "quantize"])
    assert "warning" not in ordinary.output
