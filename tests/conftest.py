"""Shared fixtures: sample model paths, a CLI runner, tiny models built on the fly."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import numpy as np
import onnx
import pytest
from click.testing import CliRunner, Result
from onnx import TensorProto, helper, numpy_helper
from safetensors.numpy import save_file

from modelpress.cli.entry import cli

SAMPLES = Path(__file__).resolve().parent.parent / "sample_models"


@pytest.fixture
def samples() -> Path:
    return SAMPLES


def run_cli(args: Sequence[str]) -> Result:
    """Invoke the CLI in-process; exceptions are kept on the result, not raised."""
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=True)


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def ort_run(path: Path | str, feeds: dict[str, np.ndarray], exact: bool = False) -> list[np.ndarray]:
    """Run a model in onnxruntime on CPU.

    exact=True keeps to basic graph optimizations: the default level fuses
    DequantizeLinear -> MatMul into MatMulNBits, which quantizes activations
    to int8 (accuracy_level 4) and so changes results slightly.
    """
    import onnxruntime as ort
    options = ort.SessionOptions()
    if exact:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def write_safetensors(path: Path, tensors: dict[str, np.ndarray],
                      metadata: dict[str, str] | None = None) -> Path:
    save_file(tensors, str(path), metadata=metadata)
    return path


def matmul_model(path: Path, weights: dict[str, np.ndarray], opset: int = 17) -> Path:
    """x -> MatMul(W1) -> Relu -> MatMul(W2) ... with the given [in, out] weights."""
    nodes, inits, current = [], [], "x"
    first = next(iter(weights.values()))
    for i, (name, w) in enumerate(weights.items()):
        out = f"h{i}"
        nodes.append(helper.make_node("MatMul", [current, name], [out]))
        inits.append(numpy_helper.from_array(w, name))
        current = out
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", first.shape[0]])],
        [helper.make_tensor_value_info(current, TensorProto.FLOAT,
                                       ["batch", list(weights.values())[-1].shape[1]])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))
    return path


def rng_weights(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
