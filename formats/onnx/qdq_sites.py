"""Where static int8 (QDQ) goes in an ONNX graph: which activations share a range, which
nodes can run as onnxruntime integer kernels, and a float-equivalent cleanup first.

onnxruntime's QDQ transformer fuses DequantizeLinear -> op -> QuantizeLinear groups into
integer kernels (QLinearConv, QLinearMatMul, MatMulIntegerToFloat, QGemm, QLinearAdd,
QLinearMul, QLinearConcat, QLinearAveragePool, QLinearGlobalAveragePool, QLinearSigmoid,
QLinearLeakyRelu) and drops Q/DQ pairs around data-movement ops (Reshape, Transpose,
MaxPool, ...) when both sides share one scale and zero point; a Relu or Clip whose output
range starts at the zero point disappears into the Q after it. Everything here serves that:
an activation is quantized only where a neighbour can use it, data-movement ops get one
range for their input and output, and a Relu's input is left to the Relu's output range.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

# Nodes with weights that run as integer kernels; the positions of their activation inputs.
COMPUTE = {"Conv": (0,), "MatMul": (0, 1), "Gemm": (0, 1)}
# Integer kernels without weights: every float input and the output are quantized.
ARITH = {"Add", "Mul", "Concat", "AveragePool", "GlobalAveragePool", "Sigmoid", "LeakyRelu"}
# Data movement: the output's values are the input's (or a subset), so both share a range.
SAME = {"Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "MaxPool", "Slice", "Pad",
        "Identity"}
# Removed by onnxruntime when the Q after them starts at their lower bound.
REMOVABLE = {"Relu", "Clip"}
FLOAT = onnx.TensorProto.FLOAT
MIN_CONV_CHANNELS = 8
"""Fewest input channels per group of a Conv that runs as QLinearConv: below it the int8
kernel is slower than float32 (open_nsfw's 7x7 stem on 3 channels, onnxruntime 1.32, one
thread, AVX2: 10.7 ms int8 against 7.8 ms float32)."""


@dataclass
class Sites:
    """The activations of a graph that QDQ may quantize, in groups that share one range.

    `groups` maps a group's name (its first tensor) to its tensors; `group_of` each
    tensor to its group; `constants` the initializers of ARITH nodes quantized with them.
    """

    groups: dict[str, list[str]] = field(default_factory=dict)
    group_of: dict[str, str] = field(default_factory=dict)
    constants: set[str] = field(default_factory=set)

    @property
    def tensors(self) -> list[str]:
        return [t for members in self.groups.values() for t in members]


def float_tensors(model: onnx.ModelProto) -> set[str]:
    """Names of float32 activations (graph inputs and node outputs, not initializers)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    inits = {t.name for t in g.initializer}
    found = {v.name for v in list(g.input) + list(g.value_info) + list(g.output)
             if v.type.tensor_type.elem_type == FLOAT}
    return found - inits


def fold_affine(model: onnx.ModelProto) -> int:
    """Fold per-channel Sub/Mul/Add/Div by constants after a Conv into its weight and bias
    (a batch norm exported as arithmetic); returns how many nodes went. Same function."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    uses: dict[str, int] = {}
    for node in g.node:
        for name in node.input:
            uses[name] = uses.get(name, 0) + 1
    outputs = {o.name for o in g.output}
    producer = {o: n for n in g.node for o in n.output}
    folded = 0
    for node in list(g.node):
        if node.op_type not in ("Sub", "Mul", "Add", "Div") or len(node.input) != 2:
            continue
        conv = producer.get(node.input[0])
        const = inits.get(node.input[1])
        if (conv is None or conv.op_type != "Conv" or const is None or conv.input[1] not in inits
                or uses.get(node.input[0]) != 1 or node.input[0] in outputs
                or uses.get(conv.input[1]) != 1):
            continue
        w = numpy_helper.to_array(inits[conv.input[1]]).astype(np.float32)
        c = numpy_helper.to_array(const).astype(np.float32)
        channels = w.shape[0]
        if c.size not in (1, channels) or (c.size == channels and c.shape[-2:] not in
                                           ((1, 1), (channels,)) and c.ndim > 1
                                           and c.shape[-3] != channels):
            continue
        c = np.broadcast_to(c.reshape(-1), (channels,)).astype(np.float32)
        if len(conv.input) > 2 and conv.input[2]:
            if uses.get(conv.input[2]) != 1 or conv.input[2] not in inits:
                continue
            b = numpy_helper.to_array(inits[conv.input[2]]).astype(np.float32)
        else:
            b = np.zeros(channels, np.float32)
        if node.op_type == "Mul" or node.op_type == "Div":
            factor = c if node.op_type == "Mul" else 1.0 / c
            w = w * factor.reshape((-1,) + (1,) * (w.ndim - 1))
            b = b * factor
        else:
            b = b + c if node.op_type == "Add" else b - c
        _set(g, inits, conv.input[1], w)
        bias_name = conv.input[2] if len(conv.input) > 2 and conv.input[2] else \
            conv.input[1] + "_folded_bias"
        _set(g, inits, bias_name, b)
        while len(conv.input) < 3:
            conv.input.append("")
        conv.input[2] = bias_name
        uses[bias_name] = 1
        conv.output[0] = node.output[0]
        producer[node.output[0]] = conv
        g.node.remove(node)
        folded += 1
    return folded


def _set(g: onnx.GraphProto, inits: dict[str, onnx.TensorProto], name: str,
         value: np.ndarray) -> None:
    tensor = numpy_helper.from_array(value.astype(np.float32), name)
    if name in inits:
        inits[name].CopyFrom(tensor)
    else:
        g.initializer.append(tensor)
        inits[name] = g.initializer[-1]


def readers(g: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    """The nodes that read each value (once per use)."""
    found: dict[str, list[onnx.NodeProto]] = {}
    for node in g.node:
        for name in node.input:
            found.setdefault(name, []).append(node)
    return found


def find_sites(model: onnx.ModelProto, floats: set[str]) -> Sites:
    """The activations to quantize and their groups (see the module's docstring)."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    consumers = readers(g)
    outputs = {o.name for o in g.output}
    wanted: set[str] = set()
    constants: set[str] = set()
    for node in g.node:
        if node.op_type in COMPUTE and fixed_reason(node, inits) is None:
            wanted.update(node.input[i] for i in COMPUTE[node.op_type]
                          if i < len(node.input) and node.input[i] in floats)
            wanted.update(o for o in node.output[:1] if o in floats)
    parent = {t: t for t in wanted}

    def find(t: str) -> str:
        while parent[t] != t:
            parent[t] = parent[parent[t]]
            t = parent[t]
        return t

    def add(t: str) -> bool:
        if t in wanted:
            return False
        wanted.add(t)
        parent[t] = t
        return True

    changed = True
    while changed:
        changed = False
        for node in g.node:
            if not node.input or not node.output or node.output[0] not in floats:
                continue
            if node.op_type in ARITH and arith_ok(node, inits):
                # Only where its inputs are int8 already: an Add or Mul between float ops
                # (inside a GELU, a norm) would only gain conversions.
                ins = [i for i in node.input if i in floats]
                if ins and all(i in wanted for i in ins):
                    changed |= add(node.output[0])
                    constants.update(i for i in node.input if i in inits and
                                     inits[i].data_type == FLOAT)
            elif node.op_type in REMOVABLE:
                if node.input[0] in wanted and clip_from_zero(node, inits):
                    changed |= add(node.output[0])
            elif node.op_type in SAME:  # data movement: input and output share one group
                src, dst = node.input[0], node.output[0]
                if src not in floats or not (src in wanted or dst in wanted):
                    continue
                changed |= add(src) | add(dst)
                a, b = find(src), find(dst)
                if a != b:
                    parent[b] = a
    for node in g.node:  # a Relu's output carries the range; its input stays as it is
        if node.op_type in REMOVABLE and node.input and node.input[0] in wanted:
            src = node.input[0]
            if (node.output[0] in floats and len(consumers.get(src, [])) == 1
                    and src not in outputs and src not in {i.name for i in g.input}
                    and find(src) == src and sum(find(t) == src for t in wanted) == 1
                    and clip_from_zero(node, inits)):
                wanted.discard(src)
                del parent[src]
                wanted.add(node.output[0])
                parent[node.output[0]] = node.output[0]
    sites = Sites(constants=constants)
    order = [i.name for i in g.input] + [o for n in g.node for o in n.output]
    by_root: dict[str, list[str]] = {}
    for t in order:
        if t in wanted:
            by_root.setdefault(find(t), []).append(t)
    # A group is named by its first tensor in graph order.
    sites.groups = {members[0]: members for members in by_root.values()}
    sites.group_of = {t: members[0] for members in by_root.values() for t in members}
    return sites


def fixed_reason(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> str | None:
    """Why a Conv/MatMul/Gemm stays float whatever its activations' ranges, or None."""
    weight = node.input[1] if len(node.input) > 1 and node.input[1] in inits else None
    if node.op_type != "MatMul" and weight is None:
        return "weight is not a constant"
    if weight is not None:
        t = inits[weight]
        if t.data_type != FLOAT:
            return "weight is not float32"
        if node.op_type != "Conv" and len(t.dims) != 2:
            return f"weight has {len(t.dims)} dimensions (integer kernels take 2)"
        if node.op_type == "Conv" and len(t.dims) > 1 and t.dims[1] < MIN_CONV_CHANNELS:
            return (f"{t.dims[1]} input channels per group: int8 Conv is slower than float "
                    f"below {MIN_CONV_CHANNELS}")
    if node.op_type == "Gemm":
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or \
                attrs.get("beta", 1.0) != 1.0:
            return "Gemm with transA, alpha or beta (QGemm takes plain Gemm)"
    if len(node.input) > 2 and node.input[2]:
        bias = inits.get(node.input[2])
        if bias is None or len(bias.dims) != 1:
            return "bias is not a 1-D constant"
    return None


def arith_ok(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> bool:
    """An ARITH node is worth quantizing unless it adds or scales by a single constant
    number (an epsilon or a norm's scalar: quantizing its input costs accuracy, buys nothing)."""
    for name in node.input:
        if name in inits and int(np.prod(inits[name].dims)) <= 1:
            return False
    return True


def clip_from_zero(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> bool:
    """A Relu, or a Clip whose lower bound is 0 (so the Q after it is its lower bound)."""
    if node.op_type == "Relu":
        return True
    lo = node.input[1] if len(node.input) > 1 else ""
    if lo and lo in inits:
        return float(numpy_helper.to_array(inits[lo]).reshape(-1)[0]) == 0.0
    for attr in node.attribute:
        if attr.name == "min":
            return attr.f == 0.0
    return False
