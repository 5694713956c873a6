"""Multiply-adds of one run of a model on given inputs, from the shapes its matrix products see.

The budgeted search (modelpress.app.sensitivity) plans how many runs it measures by this
count instead of by timing a run: the same count on every machine and at any load, so the
same model and inputs choose the same recipe. The model runs once with the inputs and outputs
of its main-graph products as outputs (on the first sample, the count then scaled by the
samples, when every input's first axis is a free batch dim and the model takes one sample);
each counts its output's elements times the inputs each sums over: MatMul and its quantized
and fused forms, Gemm, Conv, QLinearConv, ConvTranspose (input elements times each one's
reach), LSTM, GRU and RNN (each step's product with W and R). Other work (softmax,
normalizations, element-wise ops, subgraph bodies) is not counted: in the models this tool
meets, the matrix products are most of it; the search keeps a ceiling in wall time besides.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping

import numpy as np
import onnx

from modelpress.core.errors import ModelRunError
from modelpress.core.evaluate import shared_samples
from modelpress.formats.onnx.dims import input_specs
from modelpress.formats.onnx.feeds import first_line
from modelpress.formats.onnx.sessions import expose, graph_of, model_session

# op -> (input whose shape counts, input holding the weight (-1: none needed))
_ROWS = {"MatMul": (0, -1), "FusedMatMul": (0, -1), "MatMulInteger": (0, -1),
         "QLinearMatMul": (0, -1), "MatMulNBits": (0, -1), "Gemm": (0, -1),
         "Conv": (0, 1), "QLinearConv": (0, 3), "ConvTranspose": (0, 1),
         "LSTM": (0, 1), "GRU": (0, 1), "RNN": (0, 1)}


def run_macs(path: Path, feeds: Mapping[str, np.ndarray]) -> int:
    """Multiply-adds of the matrix products of the model at `path` run on `feeds` (at
    least 1)."""
    model = graph_of(path)
    nodes = [n for n in model.graph.node if n.op_type in _ROWS and len(n.input) >= 2]
    if not nodes:
        return 1
    shapes = {t.name: tuple(t.dims) for t in model.graph.initializer}
    wanted = sorted({name for n in nodes for name in (n.output[0], *n.input[:4])
                     if name and name not in shapes})
    expose(model, wanted)
    inputs = {i.name for i in model.graph.input}
    computed = [name for name in wanted if name not in inputs]
    session = model_session(model, path)
    one, count = _one_sample(model, feeds)
    try:
        values = session.run(computed, one)
    except Exception:  # onnxruntime's own types: the model wants its inputs whole
        one, count = dict(feeds), 1
        try:
            values = session.run(computed, one)
        except Exception as exc:
            raise ModelRunError(f"onnxruntime cannot run {path}: {first_line(exc)}") from None
    shapes.update((name, tuple(np.shape(v))) for name, v in zip(computed, values))
    shapes.update((name, tuple(np.shape(v))) for name, v in one.items())
    return max(1, count * sum(_node_macs(node, shapes) for node in nodes))


def _one_sample(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]
                ) -> tuple[dict[str, np.ndarray], int]:
    """The feeds cut to their first sample and how many there were, where every input's
    first axis is a free dim they share; else the feeds whole and 1."""
    count = shared_samples(feeds.values())
    free = all(spec.dims and not isinstance(spec.dims[0], int) for spec in input_specs(model)
               if spec.name in feeds)
    if not count or count < 2 or not free:
        return dict(feeds), 1
    return {k: v[:1] for k, v in feeds.items()}, count


def _node_macs(node: onnx.NodeProto, shapes: Mapping[str, tuple[int, ...]]) -> int:
    rows, weight = _ROWS[node.op_type]
    a = shapes.get(node.input[rows])
    w = shapes.get(node.input[weight]) if weight >= 0 and len(node.input) > weight else None
    out = shapes.get(node.output[0])
    recurrent = node.op_type in ("LSTM", "GRU", "RNN")
    if a is None or (weight >= 0 and w is None) or (
            out is None and not recurrent and node.op_type != "ConvTranspose"):
        return 0
    if recurrent:
        recurrent = shapes.get(node.input[2], ()) if len(node.input) > 2 else ()
        return math.prod(a[:2]) * (math.prod(w) + math.prod(recurrent))
    if node.op_type == "ConvTranspose":
        return math.prod(a) * math.prod(w[1:])
    if node.op_type in ("Conv", "QLinearConv"):
        return math.prod(out) * math.prod(w[1:])
    if node.op_type == "Gemm":
        trans = any(x.name == "transA" and x.i for x in node.attribute)
        return math.prod(out) * (a[0] if trans else a[-1]) if len(a) == 2 else 0
    return math.prod(out) * a[-1] if a else 0
