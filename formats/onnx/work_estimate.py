"""Multiply-adds of one run of a model on given inputs, from the shapes its MatMul, Gemm and
Conv nodes see.

The budgeted search (modelpress.app.sensitivity) plans how many runs it measures by this
count instead of by timing a run: the same count on every machine and at any load, so the
same model and inputs choose the same recipe. The model runs once, on the first sample when
every input shares a first axis (the count is then scaled by the samples), with the inputs
and outputs of its main-graph MatMul, Gemm and Conv nodes as outputs; each node counts its
output's elements times the inputs each of them sums over. Other nodes (attention's softmax,
normalizations, element-wise work) are not counted: in the models this tool meets the
matrix products are most of the work.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping

import numpy as np
import onnx

from modelpress.formats.onnx.sessions import graph_of, model_session

OPS = ("MatMul", "Gemm", "Conv")


def run_macs(path: Path, feeds: Mapping[str, np.ndarray]) -> int:
    """Multiply-adds of the MatMul, Gemm and Conv nodes of the model at `path` run on
    `feeds` (at least 1)."""
    model = graph_of(path)
    nodes = [n for n in model.graph.node if n.op_type in OPS and n.domain in ("", "ai.onnx")
             and len(n.input) >= 2]
    if not nodes:
        return 1
    dims = {t.name: tuple(t.dims) for t in model.graph.initializer}
    wanted = sorted({name for n in nodes for name in (n.output[0], *n.input[:2])
                     if name and name not in dims})
    present = {o.name for o in model.graph.output}
    for name in wanted:
        if name not in present:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
    firsts = {a.shape[0] if a.ndim else None for a in feeds.values()}
    count = firsts.pop() if len(firsts) == 1 else None
    scale = 1
    if count and count > 1:
        feeds = {k: v[:1] for k, v in feeds.items()}
        scale = count
    inputs = {i.name for i in model.graph.input}
    computed = [name for name in wanted if name not in inputs]
    values = dict(zip(computed, model_session(model, path).run(computed, dict(feeds))))
    shapes = dict(dims)
    shapes.update({name: tuple(np.shape(v)) for name, v in values.items()})
    shapes.update({name: tuple(np.shape(v)) for name, v in feeds.items()})
    total = sum(_node_macs(node, shapes) for node in nodes)
    return max(1, int(total) * scale)


def _node_macs(node: onnx.NodeProto, shapes: Mapping[str, tuple[int, ...]]) -> int:
    out, a, b = (shapes.get(name) for name in (node.output[0], node.input[0], node.input[1]))
    if out is None:
        return 0
    elements = math.prod(out)
    attrs = {x.name: x.i for x in node.attribute if x.type == onnx.AttributeProto.INT}
    if node.op_type == "Conv":
        return elements * math.prod(b[1:]) if b and len(b) >= 3 else 0
    if node.op_type == "Gemm":
        if not a or len(a) != 2:
            return 0
        return elements * (a[0] if attrs.get("transA", 0) else a[1])
    return elements * a[-1] if a else 0
