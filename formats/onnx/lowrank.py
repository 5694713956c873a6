"""Low-rank weights (LowRank) in ONNX: the one encoding that rewrites its consumer.

When W's only use is the weight input of one MatMul or Gemm, that node is
replaced by two, so the runtime does the cheaper work:

- `MatMul(X, W)` -> `MatMul(MatMul(X, U), V)`; `MatMul(W, X)` -> `MatMul(U, MatMul(V, X))`.
- `Gemm(A, W, C)` -> `Gemm(Gemm(A, U), V, C)`, or with transB=1 (W = U @ V
  stored [N, K]) `Gemm(Gemm(A, V, transB=1), U, C, transB=1)`; alpha, beta
  and transA are kept.

Otherwise (W feeds other ops, several nodes, or a graph output) W is made by
a `MatMul(U, V)` node under its own name. onnxruntime folds that node at
load when U and V are plain initializers: the file is smaller, inference
costs the same as before. Each factor is emitted like any encoded tensor
(plain, DequantizeLinear, Cast, codebook) under a fresh name. The original
consumer node is kept, serialized, in the spec so `decompress` can put it back.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import onnx
from onnx import helper

from modelpress.core.encoded import LowRank

from modelpress.formats.onnx.emit import emit
from modelpress.formats.onnx.emitted import Emitted, FreshName
from modelpress.formats.onnx.graph import consumers, graphs, is_output


def emit_lowrank(model: onnx.ModelProto, name: str, enc: LowRank, fresh: FreshName,
                 dtype: np.dtype, opset: int) -> tuple[Emitted, str]:
    """The factors' initializers and nodes, with the consumer rewritten when possible.

    Returns the emitted parts (to be placed where W was) and the form used:
    'rewrite' or 'product'. The rewrite itself is done on `model` here.
    """
    u, v = fresh(f"{name}_lowrank_left"), fresh(f"{name}_lowrank_right")
    left, right = emit(u, enc.left, fresh, dtype, opset), emit(v, enc.right, fresh, dtype, opset)
    left.spec["shape"], right.spec["shape"] = list(enc.left.shape), list(enc.right.shape)
    out = Emitted(initializers=left.initializers + right.initializers,
                  nodes=left.nodes + right.nodes, opset=max(left.opset, right.opset),
                  functions=left.functions + right.functions)
    spec: dict[str, Any] = {"layout": "lowrank", "rank": enc.rank, "left": left.spec,
                            "right": right.spec, "outputs": [u, v]}
    uses = consumers(model, name)
    rewrite = _rewrite_nodes(uses[0][1], name, u, v, fresh) if (
        len(uses) == 1 and not is_output(model, name)) else None
    if rewrite is None:
        node = fresh(f"{name}_lowrank_MatMul")
        out.nodes.append(helper.make_node("MatMul", [u, v], [name], name=node))
        spec.update(form="product", nodes=[node])
    else:
        graph, original = uses[0]
        index = list(graph.node).index(original)
        del graph.node[index]
        for j, node in enumerate(rewrite):
            graph.node.insert(index + j, node)
        spec.update(form="rewrite", nodes=[n.name for n in rewrite],
                    consumer=base64.b64encode(original.SerializeToString()).decode("ascii"))
    out.spec = spec
    return out, spec["form"]


def _rewrite_nodes(node: onnx.NodeProto, name: str, u: str, v: str,
                   fresh: FreshName) -> list[onnx.NodeProto] | None:
    """The two nodes replacing `node`, or None when it is not a MatMul/Gemm weight use."""
    if node.domain not in ("", "ai.onnx"):
        return None
    inputs, y = list(node.input), node.output[0]
    mid = fresh(f"{name}_lowrank_mid")
    first, second = fresh(f"{name}_lowrank_first"), fresh(f"{name}_lowrank_second")
    if node.op_type == "MatMul" and inputs[1] == name:
        return [helper.make_node("MatMul", [inputs[0], u], [mid], name=first),
                helper.make_node("MatMul", [mid, v], [y], name=second)]
    if node.op_type == "MatMul" and inputs[0] == name:
        return [helper.make_node("MatMul", [v, inputs[1]], [mid], name=first),
                helper.make_node("MatMul", [u, mid], [y], name=second)]
    if node.op_type != "Gemm" or inputs[1] != name:
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    trans_a, trans_b = attrs.get("transA", 0), attrs.get("transB", 0)
    outer = {"alpha": attrs.get("alpha", 1.0), "beta": attrs.get("beta", 1.0)}
    bias = inputs[2:3] if len(inputs) > 2 and inputs[2] else []
    if trans_b:  # A' @ W.T = (A' @ V.T) @ U.T
        return [helper.make_node("Gemm", [inputs[0], v], [mid], name=first, transA=trans_a,
                                 transB=1),
                helper.make_node("Gemm", [mid, u] + bias, [y], name=second, transB=1, **outer)]
    return [helper.make_node("Gemm", [inputs[0], u], [mid], name=first, transA=trans_a),
            helper.make_node("Gemm", [mid, v] + bias, [y], name=second, **outer)]


def restore_consumer(model: onnx.ModelProto, spec: dict[str, Any]) -> None:
    """Put back the node a 'rewrite' replaced (before its replacements are removed)."""
    if spec.get("form") != "rewrite":
        return
    original = onnx.NodeProto()
    original.ParseFromString(base64.b64decode(spec["consumer"]))
    first = spec["nodes"][0]
    for graph in graphs(model.graph):
        names = [n.name for n in graph.node]
        if first in names:
            graph.node.insert(names.index(first), original)
            return
    raise ValueError(f"node {first!r} of a low-rank rewrite is missing")


def product_note(name: str, enc: LowRank) -> str:
    """The report's note for a tensor whose factors are multiplied back in the graph."""
    folded = all(type(f).__name__ == "Dense" for f in (enc.left, enc.right))
    cost = ("onnxruntime folds the product at load, so the file is smaller but inference "
            "is not faster" if folded else
            "its factors are dequantized and multiplied at every run, so the file is smaller "
            "but inference is slower")
    return (f"{name}: low-rank factors are multiplied back into the weight by a MatMul node "
            f"(the weight is not the only input of a single MatMul/Gemm); {cost}")
