"""Static int8 in ONNX: QuantizeLinear/DequantizeLinear (QDQ) on activations, int8 weights.

The form onnxruntime's QDQ transformer fuses into integer kernels (see `qdq_sites`):
activations uint8, asymmetric, one scale and zero point per tensor (from calibration);
Conv/MatMul/Gemm weights int8, symmetric, one float scale per output channel
(DequantizeLinear with `axis`); Conv and Gemm biases int32 on the scale
input_scale x weight_scale, as QLinearConv and QGemm take them; float constants of
Add/Mul/Concat uint8 per tensor. A Conv/MatMul/Gemm that stays float (activations kept
float, or its integer kernel measured slower: `slow`) can still store its weight as int8
(`weight_only`): int8 codes on the full range (-127..127: no integer kernel reads them),
Cast to float and multiplied by per-channel scales in front of the float kernel, which
onnxruntime's constant folding turns back into the float weight when it loads the model.
Not a DequantizeLinear: onnxruntime never folds those (its QDQ passes need them), runs them at
every call, turns DequantizeLinear -> MatMul into MatMulNBits and keeps a Conv behind one out
of its NCHWc layout (measured with onnxruntime 1.32 on this AVX2 CPU, one thread: 256x256
MatMul on 128 rows 0.40 -> 1.25 ms; magika's main Conv 24.5 -> 29.8 ms). Whether the
weight-only form costs time is measured anyway (`app.speed`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import onnx
from onnx import helper, numpy_helper

from modelpress.core.activation_ranges import ActivationRange, range_for
from modelpress.formats.onnx.qdq_sites import (ARITH, COMPUTE, REMOVABLE, Sites, arith_ok,
                                               fixed_reason, readers)

WEIGHT_MAX = 63
"""Largest weight code: symmetric per channel on 7 bits of the int8 grid (-63..63).

onnxruntime's u8s8 kernels on x86 CPUs without VNNI (AVX2) multiply with VPMADDUBSW,
which adds pairs of uint8 x int8 products in int16 and saturates: with weights up to 127
and activations up to 255 a pair reaches 64770. Measured on a 64-96-32 MatMul model with
onnxruntime 1.32 on AVX2: output error 0.054 fused vs 0.016 unfused at 127; 0.022 both ways
at 63. 63 keeps every pair under 32767 on every CPU (what quantize_static's reduce_range
does), so the file runs the same everywhere."""
WEIGHT_ONLY_MAX = 127
"""Largest weight code of a weight-only DequantizeLinear feeding a float kernel."""


@dataclass
class QdqResult:
    """The QDQ model, its weights (name -> bytes before, bytes after) and, for each
    Conv/MatMul/Gemm, whether it was made integer or why it stays float."""

    model: onnx.ModelProto
    weights: dict[str, tuple[int, int]] = field(default_factory=dict)
    integer: list[str] = field(default_factory=list)
    float_reasons: dict[str, str] = field(default_factory=dict)
    weight_only: list[str] = field(default_factory=list)
    stored: dict[str, tuple[str, str, int, str]] = field(default_factory=dict)
    """Weight name -> its codes' and scales' initializers, the channel axis, the form."""


class _Builder:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.g = model.graph
        self.inits = {t.name: t for t in self.g.initializer}
        self.names = {t.name for t in self.g.initializer} | {i.name for i in self.g.input} | {
            o for n in self.g.node for o in list(n.output) + list(n.input) + [n.name]}
        self.new_inits: list[onnx.TensorProto] = []
        self.made: dict[tuple, str] = {}

    def fresh(self, base: str) -> str:
        name, i = base, 1
        while name in self.names:
            name, i = f"{base}_{i}", i + 1
        self.names.add(name)
        return name

    def init(self, base: str, value: np.ndarray) -> str:
        name = self.fresh(base)
        self.new_inits.append(numpy_helper.from_array(value, name))
        return name

    def dq_const(self, key: tuple, base: str, codes: np.ndarray, scale: np.ndarray,
                 zero: np.ndarray, axis: int | None) -> tuple[str, onnx.NodeProto | None]:
        """A DequantizeLinear of constant codes, made once per key."""
        if key in self.made:
            return self.made[key], None
        inputs = [self.init(base + "_quantized", codes), self.init(base + "_scale", scale),
                  self.init(base + "_zero_point", zero)]
        out = self.fresh(base + "_dequantized")
        attrs = {} if axis is None else {"axis": axis}
        node = helper.make_node("DequantizeLinear", inputs, [out], self.fresh(out), **attrs)
        self.made[key] = out
        return out, node


SLOW_REASON = "its int8 kernel measured slower than float on this machine"


def name_nodes(model: onnx.ModelProto) -> None:
    """Give every unnamed node of `model` a unique name (in place): `build`, the search and
    onnxruntime's profiles refer to nodes by name."""
    b = _Builder(model)
    for node in b.g.node:
        if not node.name:
            node.name = b.fresh(f"{node.op_type}_{len(b.names)}")


def build(model: onnx.ModelProto, sites: Sites, ranges: dict[str, ActivationRange],
          keep: set[str], slow: frozenset[str] = frozenset(),
          weight_only: frozenset[str] = frozenset()) -> QdqResult:
    """A copy of `model` with every site group in `ranges` and not in `keep` quantized; the
    Conv/MatMul/Gemm named in `slow` stay float, and those of `weight_only` that run float
    get int8 weights (see the module's docstring)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    name_nodes(out)
    b = _Builder(out)
    g = b.g
    act = {t: ranges[sites.group_of[t]] for t in sites.tensors
           if sites.group_of[t] not in keep and sites.group_of[t] in ranges}
    consumers = readers(g)
    act = _useful(g, sites, act, b.inits, consumers, slow)
    result = QdqResult(out)
    nodes: list[onnx.NodeProto] = []
    for inp in g.input:
        if inp.name in act:
            dq = _quantize_activation(b, inp.name, act[inp.name], nodes, rename_output=False)
            act[dq] = act[inp.name]
            for node in consumers.get(inp.name, []):
                for i, name in enumerate(node.input):
                    if name == inp.name:
                        node.input[i] = dq
    for node in list(g.node):
        if node.op_type in COMPUTE:
            reason = _integer_reason(node, act, b.inits, consumers, slow)
            if reason is None:
                nodes.extend(_quantize_weights(b, node, act, result))
                result.integer.append(node.name)
            else:
                result.float_reasons[node.name] = reason
                if node.name in weight_only and weight_only_ok(node, b.inits):
                    nodes.extend(_weight_only(b, node, result))
        elif node.op_type in ARITH and arith_ok(node, b.inits) and all(
                i in act for i in node.input if i not in b.inits):
            nodes.extend(_quantize_constants(b, node, sites))
        nodes.append(node)
        for name in node.output[:1]:
            if name in act:
                _quantize_activation(b, name, act[name], nodes, rename_output=True, node=node)
    del g.node[:]
    g.node.extend(nodes)
    used = {i for n in g.node for i in n.input}
    kept = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(kept + b.new_inits)
    return result


def quantized_groups(model: onnx.ModelProto, sites: Sites, keep: set[str],
                     slow: frozenset[str] = frozenset()) -> set[str]:
    """The site groups `build` quantizes when `keep` (and the nodes `slow`) stay float:
    those left that touch an integer kernel (see `_useful`)."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    consumers = readers(g)
    unit = ActivationRange(1.0, 0, "minmax")
    act = {t: unit for t in sites.tensors if sites.group_of[t] not in keep}
    return {sites.group_of[t] for t in _useful(g, sites, act, inits, consumers, slow)}


def _useful(g: onnx.GraphProto, sites: Sites, act: dict[str, ActivationRange],
            inits: dict[str, onnx.TensorProto], consumers: dict[str, list[onnx.NodeProto]],
            slow: frozenset[str] = frozenset()) -> dict[str, ActivationRange]:
    """`act` without the groups that touch no integer kernel (their Q/DQ would cost time and
    error for nothing): a group is kept when an integer Conv/MatMul/Gemm reads or writes it,
    or an int8 Add/Mul/Concat/pool joins it to such a group."""
    useful: set[str] = set()
    for node in g.node:
        if node.op_type in COMPUTE and _integer_reason(node, act, inits, consumers,
                                                       slow) is None:
            touched = [t for t in node.input[:2] if t in act] + [node.output[0]] + [
                n.output[0] for n in consumers.get(node.output[0], []) if n.op_type in REMOVABLE]
            useful.update(sites.group_of[t] for t in touched if t in act)
    changed = True
    while changed:
        changed = False
        for node in g.node:
            if node.op_type in ARITH or node.op_type in REMOVABLE:
                ins = [i for i in node.input if i in act]
                if not ins or any(i not in act for i in node.input if i not in inits and i):
                    continue
                touched = {sites.group_of[t] for t in ins + [o for o in node.output[:1]
                                                            if o in act]}
                if touched & useful and not touched <= useful:
                    useful |= touched
                    changed = True
    return {t: r for t, r in act.items() if sites.group_of[t] in useful}


def _quantize_activation(b: _Builder, name: str, r: ActivationRange, nodes: list[onnx.NodeProto], *,
                         rename_output: bool, node: onnx.NodeProto | None = None) -> str:
    """Q -> DQ on `name`: the producer's output is renamed so readers (and graph outputs)
    get the dequantized value under the old name; a graph input gets a new DQ name."""
    scale = b.init(name + "_scale", np.array(r.scale, np.float32))
    zero = b.init(name + "_zero_point", np.array(r.zero_point, np.uint8))
    q_out = b.fresh(name + "_quantized")
    if rename_output:
        source = b.fresh(name + "_float")
        node.output[0] = source
        dq_out = name
    else:
        source, dq_out = name, b.fresh(name + "_dequantized")
    nodes.append(helper.make_node("QuantizeLinear", [source, scale, zero], [q_out],
                                  b.fresh(q_out + "_Q")))
    nodes.append(helper.make_node("DequantizeLinear", [q_out, scale, zero], [dq_out],
                                  b.fresh(q_out + "_DQ")))
    return dq_out


def _integer_reason(node: onnx.NodeProto, act: dict[str, ActivationRange],
                    inits: dict[str, onnx.TensorProto],
                    consumers: dict[str, list[onnx.NodeProto]],
                    slow: frozenset[str] = frozenset()) -> str | None:
    """None when `node` can run as an integer kernel, else why it stays float."""
    fixed = fixed_reason(node, inits)
    if fixed is not None:
        return fixed
    if node.name in slow:
        return SLOW_REASON
    acts = [node.input[i] for i in COMPUTE[node.op_type]
            if i < len(node.input) and node.input[i] not in inits]
    float_in = [a for a in acts if a not in act]
    if float_in:
        return f"input {float_in[0]!r} kept float"
    if node.op_type == "Conv" and not _output_quantized(node.output[0], act, consumers):
        return f"output {node.output[0]!r} kept float (QLinearConv needs a quantized output)"
    return None


def _output_quantized(name: str, act: dict[str, ActivationRange],
                      consumers: dict[str, list[onnx.NodeProto]]) -> bool:
    if name in act:
        return True
    after = consumers.get(name, [])
    return len(after) == 1 and after[0].op_type in REMOVABLE and after[0].output[0] in act


def weight_axis(node: onnx.NodeProto) -> int:
    """The output-channel axis of a Conv/MatMul/Gemm weight."""
    trans_b = any(a.name == "transB" and a.i for a in node.attribute)
    return 0 if node.op_type == "Conv" or (node.op_type == "Gemm" and trans_b) else 1


def weight_codes(w: np.ndarray, axis: int,
                 limit: int = WEIGHT_MAX) -> tuple[np.ndarray, np.ndarray]:
    """int8 codes and per-channel float32 scales of `w` (symmetric, -limit..limit)."""
    reduce = tuple(i for i in range(w.ndim) if i != axis)
    amax = np.abs(w).max(axis=reduce) if w.size else np.zeros(w.shape[axis], np.float32)
    scale = np.where(amax > 0, amax / limit, 1.0).astype(np.float32)
    codes = np.clip(np.rint(w / _along(scale, axis, w.ndim)), -limit, limit)
    return codes.astype(np.int8), scale


def _along(v: np.ndarray, axis: int, ndim: int) -> np.ndarray:
    shape = [1] * ndim
    shape[axis] = -1
    return v.reshape(shape)


def fake_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose Conv/MatMul/Gemm constant weights hold their int8 values
    (decoded to float): with fake-quantized activations it computes what the QDQ model
    computes, in one float session."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name: t for t in out.graph.initializer}
    for node in out.graph.node:
        if node.op_type in COMPUTE and len(node.input) > 1 and node.input[1] in inits:
            t = inits[node.input[1]]
            if t.data_type != onnx.TensorProto.FLOAT or (node.op_type != "Conv" and
                                                         len(t.dims) != 2):
                continue
            w = numpy_helper.to_array(t).astype(np.float32)
            axis = weight_axis(node)
            codes, scale = weight_codes(w, axis)
            t.CopyFrom(numpy_helper.from_array(
                codes.astype(np.float32) * _along(scale, axis, w.ndim), t.name))
    return out


def _quantize_weights(b: _Builder, node: onnx.NodeProto, act: dict[str, ActivationRange],
                      result: QdqResult) -> list[onnx.NodeProto]:
    """DequantizeLinear nodes for an integer node's weight (and bias); rewires the node."""
    made: list[onnx.NodeProto] = []
    name = node.input[1]
    if name not in b.inits:  # MatMul of two activations
        return made
    w = numpy_helper.to_array(b.inits[name]).astype(np.float32)
    axis = weight_axis(node)
    codes, scale = weight_codes(w, axis)
    dq, dq_node = b.dq_const(("weight", name, axis), name, codes, scale,
                             np.zeros(scale.shape, np.int8), axis)
    if dq_node is not None:
        made.append(dq_node)
        result.weights[name] = (w.nbytes, codes.nbytes + scale.nbytes + scale.size)
        result.stored[name] = (dq_node.input[0], dq_node.input[1], axis, "QDQ")
    node.input[1] = dq
    if len(node.input) > 2 and node.input[2]:
        bias_name = node.input[2]
        bias = numpy_helper.to_array(b.inits[bias_name]).astype(np.float64)
        s_bias = (act[node.input[0]].scale * scale.astype(np.float64))
        codes32 = np.clip(np.rint(bias / s_bias), -2**31, 2**31 - 1).astype(np.int32)
        key = ("bias", node.name)
        dq_b, dq_b_node = b.dq_const(key, bias_name, codes32, s_bias.astype(np.float32),
                                     np.zeros(s_bias.shape, np.int32), 0)
        made.append(dq_b_node)
        node.input[2] = dq_b
    return made


def weight_only_ok(node: onnx.NodeProto, inits: Mapping[str, onnx.TensorProto]) -> bool:
    """A Conv/MatMul/Gemm whose weight can be stored as int8 before a float kernel: a float32
    constant (2-D for MatMul/Gemm)."""
    if node.op_type not in COMPUTE or len(node.input) < 2 or node.input[1] not in inits:
        return False
    t = inits[node.input[1]]
    return t.data_type == onnx.TensorProto.FLOAT and (node.op_type == "Conv" or
                                                      len(t.dims) == 2)


def _weight_only(b: _Builder, node: onnx.NodeProto, result: QdqResult) -> list[onnx.NodeProto]:
    """Cast(int8 codes) x per-channel scale for a float node's weight; rewires the node.
    Both inputs are constants, so onnxruntime's constant folding turns them back into the
    float weight when it loads the model (a DequantizeLinear would run at every call)."""
    name = node.input[1]
    w = numpy_helper.to_array(b.inits[name]).astype(np.float32)
    axis = weight_axis(node)
    key = ("weight-only", name, axis)
    node.input[1] = b.made.get(key, "")
    result.weight_only.append(node.name)
    if node.input[1]:
        return []
    codes, scale = weight_codes(w, axis, WEIGHT_ONLY_MAX)
    stored = b.init(name + "_quantized", codes)
    factor = b.init(name + "_scale", _along(scale, axis, w.ndim))
    cast = b.fresh(name + "_cast")
    out = b.fresh(name + "_dequantized")
    b.made[key] = node.input[1] = out
    result.weights[name] = (w.nbytes, codes.nbytes + scale.nbytes)
    result.stored[name] = (stored, factor, axis, "weight-only, folded by onnxruntime at load")
    return [helper.make_node("Cast", [stored], [cast], b.fresh(cast), to=onnx.TensorProto.FLOAT),
            helper.make_node("Mul", [cast, factor], [out], b.fresh(out))]


def _quantize_constants(b: _Builder, node: onnx.NodeProto,
                        sites: Sites) -> list[onnx.NodeProto]:
    """uint8 DequantizeLinear for the float constant inputs of a quantized Add/Mul/Concat."""
    made = []
    for i, name in enumerate(node.input):
        if name not in sites.constants or name not in b.inits:
            continue
        c = numpy_helper.to_array(b.inits[name]).astype(np.float32)
        r = range_for(float(c.min()) if c.size else 0.0, float(c.max()) if c.size else 0.0,
                      "minmax")
        codes = np.clip(np.rint(c / r.scale) + r.zero_point, 0, 255).astype(np.uint8)
        dq, dq_node = b.dq_const(("const", name), name, codes, np.array(r.scale, np.float32),
                                 np.array(r.zero_point, np.uint8), None)
        if dq_node is not None:
            made.append(dq_node)
        node.input[i] = dq
    return made
