"""Issue 15: hostile or odd inputs that once gave wrong output, a traceback or a hang."""

from __future__ import annotations

from pathlib import Path

import numpy as np
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
