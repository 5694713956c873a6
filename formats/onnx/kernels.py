"""onnxruntime's graph passes for static int8: the float graph QDQ starts from, and which
nodes it runs as integer kernels, read from its optimized graph.

onnxruntime rewrites a QDQ model when it loads it (its QDQ transformer, then
layout and fusion passes); `SessionOptions.optimized_model_filepath` saves the
graph it will run. Counting that graph's node types tells integer kernels
(QLinearConv, QLinearMatMul, MatMulIntegerToFloat, QGemm, ...) from float
Conv/MatMul/Gemm that fell back, and how many Q/DQ conversions remain.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import onnx
import onnxruntime as ort

from modelpress.core.errors import ModelRunError
from modelpress.formats.onnx.feeds import first_line
from modelpress.formats.onnx.qdq_sites import fold_affine

INTEGER_OPS = ("QLinearConv", "QLinearMatMul", "MatMulInteger", "ConvInteger",
               "MatMulIntegerToFloat", "QGemm", "DynamicQuantizeMatMul", "QLinearAdd",
               "QLinearMul", "QLinearConcat", "QLinearAveragePool", "QLinearGlobalAveragePool",
               "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax", "MatMulNBits")
"""Node types that compute on integers (MatMulNBits: with int8 activations)."""
FLOAT_OPS = ("Conv", "MatMul", "Gemm", "FusedConv", "FusedMatMul", "FusedGemm", "NchwcConv",
             "ConvTranspose")
"""Float node types that do a heavy product (what integer kernels replace)."""
CONVERSIONS = ("QuantizeLinear", "DequantizeLinear")


@dataclass
class Kernels:
    """Node counts of onnxruntime's optimized graph: integer kernels, float products,
    remaining Q/DQ conversions, and the names of the float products."""

    integer: dict[str, int] = field(default_factory=dict)
    floating: dict[str, int] = field(default_factory=dict)
    conversions: dict[str, int] = field(default_factory=dict)
    float_nodes: list[str] = field(default_factory=list)

    @property
    def integer_count(self) -> int:
        return sum(self.integer.values())

    @property
    def float_count(self) -> int:
        return sum(self.floating.values())

    def as_dict(self) -> dict[str, Any]:
        return {"integer": dict(self.integer), "float": dict(self.floating),
                "conversions": dict(self.conversions), "integer_count": self.integer_count,
                "float_count": self.float_count, "float_nodes": list(self.float_nodes)}


def float_graph(path: Path) -> tuple[onnx.ModelProto, int]:
    """The float model as onnxruntime's basic (hardware-independent) passes leave it:
    constants folded, Conv+BatchNorm and MatMul+Add fused; then per-channel arithmetic
    after a Conv folded into it (`qdq_sites.fold_affine`). Returns it and the nodes folded."""
    with tempfile.TemporaryDirectory(prefix="modelpress-qdq-") as tmp:
        options = _options(0)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(Path(tmp) / "basic.onnx")
        try:
            ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            model = onnx.load(options.optimized_model_filepath)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelRunError(f"onnxruntime cannot load {path}: {first_line(exc)}") from None
    return model, fold_affine(model)


def _options(threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.log_severity_level = 4
    if threads:
        options.intra_op_num_threads = threads
    return options


def optimized_kernels(path: Path, threads: int = 0) -> Kernels:
    """Count the node types of the graph onnxruntime (CPU, default optimizations) runs for
    the model at `path`."""
    with tempfile.TemporaryDirectory(prefix="modelpress-kernels-") as tmp:
        saved = Path(tmp) / "optimized.onnx"
        options = _options(threads)
        options.optimized_model_filepath = str(saved)
        try:
            ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            graph = onnx.load(str(saved), load_external_data=False).graph
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelRunError(f"onnxruntime cannot load {path}: {first_line(exc)}") from None
    return count(graph)


def count(graph: onnx.GraphProto) -> Kernels:
    """The Kernels of an (optimized) graph."""
    types = Counter(node.op_type for node in graph.node)
    found = Kernels(
        integer={k: types[k] for k in INTEGER_OPS if types[k]},
        floating={k: types[k] for k in FLOAT_OPS if types[k]},
        conversions={k: types[k] for k in CONVERSIONS if types[k]})
    found.float_nodes = [node.name for node in graph.node if node.op_type in FLOAT_OPS]
    return found
