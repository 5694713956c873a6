"""Output-side moments probed in onnxruntime (modelpress.formats.onnx.probe): layers whose
output reaches the model's outputs unevenly, and Gather tables, rounded under them beat
GPTQ under the input moments alone (or plain rounding, for a table) on other inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from modelpress import Quantize, Recipe, compress
from modelpress.formats.onnx import probe

from conftest import ort_run

K, N, V = 32, 24, 40


def _save(path: Path, nodes, inputs, weights: dict[str, np.ndarray]) -> Path:
    graph = helper.make_graph(nodes, "g", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 8] if "x" in str(inputs) else ["b", 6, 8])],
                              [numpy_helper.from_array(w, n) for n, w in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _mix(rng: np.random.Generator) -> np.ndarray:
    """A fixed [N, 8] matrix of very uneven singular values: the layer's output channels
    reach the model's output through few directions."""
    u, _ = np.linalg.qr(rng.standard_normal((N, N)))
    return (u[:, :8] * np.array([8, 4, 2, 1, 0.5, 0.25, 0.1, 0.05])).astype(np.float32)


def _layer(path: Path) -> Path:
    """x [b, K] -> MatMul w [K, N] -> MatMul mix [N, 8] (too small to be quantized)."""
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((K, N)) / 4).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("MatMul", ["h", "mix"], ["y"])]
    return _save(path, nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", K])],
                 {"w": w, "mix": _mix(rng)})


def _table(path: Path) -> Path:
    """ids [b, 6] -> Gather table [V, N] -> MatMul mix [N, 8]."""
    rng = np.random.default_rng(4)
    table = (rng.standard_normal((V, N)) / 4).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"]),
             helper.make_node("MatMul", ["e", "mix"], ["y"])]
    return _save(path, nodes, [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", 6])],
                 {"table": table, "mix": _mix(rng)})


def _error(src: Path, dst: Path, feeds: dict[str, np.ndarray]) -> float:
    reference = ort_run(src, feeds, exact=True)[0]
    return float(np.linalg.norm(ort_run(dst, feeds, exact=True)[0] - reference)
                 / np.linalg.norm(reference))


def _errors(tmp_path: Path, src: Path, feeds, name: str,
            monkeypatch: pytest.MonkeyPatch) -> dict[str, tuple[float, int, list[str]]]:
    """Output error on other inputs, size and notes: probed, and with probing off; `name`
    at 3 bits, "mix" (the model runs only for a MatMul/Gemm/Conv weight) at 8."""
    np.savez(tmp_path / "cal.npz", **feeds(32, seed=1))
    found = {}
    for label, directions in (("probed", probe.MAX_DIRECTIONS), ("off", 0)):
        monkeypatch.setattr(probe, "MAX_DIRECTIONS", directions)
        dst = tmp_path / f"{label}.onnx"
        recipe = Recipe([Quantize(bits=3, include=(name,), all_layers=True),
                         Quantize(bits=8, include=("mix",))])
        report = compress(src, dst, recipe, calibration=str(tmp_path / "cal.npz"))
        found[label] = (_error(src, dst, feeds(64, seed=2)), dst.stat().st_size, report.notes)
    return found


def test_a_layer_rounded_under_its_output_moments_beats_gptq_alone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def feeds(samples: int, seed: int) -> dict[str, np.ndarray]:
        return {"x": np.random.default_rng(seed).standard_normal((samples, K)).astype(
            np.float32)}

    found = _errors(tmp_path, _layer(tmp_path / "m.onnx"), feeds, "w", monkeypatch)
    assert found["probed"][1] == found["off"][1]
    assert found["probed"][0] < 0.5 * found["off"][0], found
    assert ("--calibration: output-side moments probed for 1 tensors (24 directions, 2 runs "
            "each)" in found["probed"][2]), found["probed"][2]
    assert "--calibration: 2 of 2 quantized tensors rounded by GPTQ" in found["off"][2]


def test_a_gather_table_rounded_under_its_rows_metric_beats_plain_rounding(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def feeds(samples: int, seed: int) -> dict[str, np.ndarray]:
        return {"ids": np.random.default_rng(seed).integers(0, V, (samples, 6))}

    src = _table(tmp_path / "t.onnx")
    found = _errors(tmp_path, src, feeds, "table", monkeypatch)
    assert found["probed"][1] == found["off"][1]
    assert found["probed"][0] < 0.5 * found["off"][0], found
    assert "--calibration: 2 of 2 quantized tensors rounded by GPTQ" in found["probed"][2]
    assert "; 1 by mse instead, e.g. 'table' (not probed" in " ".join(found["off"][2])
