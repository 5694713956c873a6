"""SmoothQuant (Xiao et al., 2022): per-channel scale moved from an activation into the
weights that multiply it, so that int8 activations lose less to a few outlier channels.

For an activation X whose every consumer is a MatMul (or Gemm) with a constant weight
W [K, N], channel j of X is divided by s_j and row j of each W multiplied by it:
X W = (X / s) (s W), the same float model. s_j = max|X_j|^alpha / max|W_j|^(1-alpha),
max|W_j| over all consumers' rows j. Dividing X needs an op in front of it that
absorbs a per-channel factor: a LayerNormalization (its scale and bias), an affine
Mul (-> Add) by constant per-channel vectors, or a MatMul / Gemm with a constant
weight (its output columns, and bias). Anything else is left alone, and a note says
why. max|X_j| comes from `activation_stats.collect_stats(..., channels=...)`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from modelpress.formats.onnx.graph import fresh_name, used_names

MIN_SCALE, MAX_SCALE = 1e-5, 1e5  # bounds on s_j (a dead channel must not blow up W)


@dataclass(frozen=True)
class Site:
    """One smoothable activation: its consumers (node, index of the weight input, whether
    the weight is [N, K]) and the absorbing tensors in front of it (initializer name ->
    axis of the channel in it, or None for a per-channel vector)."""

    activation: str
    consumers: tuple[tuple[onnx.NodeProto, int, bool], ...]
    absorbers: tuple[tuple[onnx.NodeProto, int, int | None], ...]


def sites(model: onnx.ModelProto) -> tuple[list[Site], list[str]]:
    """The activations `smooth` can act on, and a note per MatMul/Gemm input it cannot."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, i))
    producers = {out: node for node in graph.node for out in node.output}
    outputs = {o.name for o in graph.output}
    found, notes = [], []
    seen: set[str] = set()
    for node in graph.node:
        if _weight_use(node, 0, inits) is None or node.input[0] in seen:
            continue
        x = node.input[0]
        seen.add(x)
        uses = [_weight_use(n, i, inits) for n, i in consumers[x]]
        label = f"{node.op_type} {node.name or node.output[0]!r}"
        if any(u is None for u in uses):
            other = next(n for (n, i), u in zip(consumers[x], uses) if u is None)
            notes.append(f"smooth: {label} not smoothed: its input {x!r} also feeds "
                         f"{other.op_type} {other.name or other.output[0]!r}")
            continue
        if x in outputs:
            notes.append(f"smooth: {label} not smoothed: its input {x!r} is a graph output")
            continue
        absorbers, why = _absorbers(_Graph(inits, consumers, producers, outputs), x)
        if absorbers is None:
            notes.append(f"smooth: {label} not smoothed: its input {x!r} {why}")
            continue
        found.append(Site(x, tuple(uses), absorbers))
    return found, notes


def _weight_use(node: onnx.NodeProto, index: int, inits) -> tuple[onnx.NodeProto, int, bool] | None:
    """(node, weight input, weight is [N, K]) when input `index` of `node` is the activation
    of a MatMul / Gemm whose weight is a 2-D initializer."""
    if node.domain not in ("", "ai.onnx") or index != 0 or len(node.input) < 2:
        return None
    weight = inits.get(node.input[1])
    if weight is None or len(weight.dims) != 2:
        return None
    attrs = {a.name: a.i for a in node.attribute if a.type == onnx.AttributeProto.INT}
    if node.op_type == "MatMul":
        return node, 1, False
    if node.op_type == "Gemm" and not attrs.get("transA", 0):
        return node, 1, bool(attrs.get("transB", 0))
    return None


@dataclass
class _Graph:
    inits: dict[str, onnx.TensorProto]
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]]
    producers: dict[str, onnx.NodeProto]
    outputs: set[str]


def _absorbers(g: _Graph, x: str):
    """The tensors that scale x's channels, or (None, why not)."""
    producer = g.producers.get(x)
    if producer is None:
        return None, "is a graph input"
    op = producer.op_type
    if producer.domain not in ("", "ai.onnx"):
        return None, f"comes from {producer.domain}.{op}, which cannot absorb a scale"
    if op == "LayerNormalization":
        axis = next((a.i for a in producer.attribute if a.name == "axis"), -1)
        vectors = [i for i in (1, 2) if i < len(producer.input) and producer.input[i]]
        if axis != -1 or any(len(_dims(g.inits, producer.input[i]) or (0, 0)) != 1
                             for i in vectors):
            return None, "comes from a LayerNormalization without per-channel constants"
        return tuple((producer, i, None) for i in vectors), ""
    if op in ("MatMul", "Gemm"):
        use = _weight_use(producer, 0, g.inits)
        if use is None:
            return None, f"comes from a {op} without a constant 2-D weight"
        found = [(producer, 1, 0 if use[2] else 1)]
        if op == "Gemm" and len(producer.input) > 2 and producer.input[2]:
            if _dims(g.inits, producer.input[2]) is None:
                return None, "comes from a Gemm whose bias is not constant"
            found.append((producer, 2, None))
        return tuple(found), ""
    if op in ("Add", "Mul") and len(producer.input) == 2:
        const = next((i for i in (0, 1) if len(_dims(g.inits, producer.input[i]) or ()) == 1),
                     None)
        if const is None:
            return None, f"comes from {op} without a per-channel constant"
        if op == "Mul":
            return ((producer, const, None),), ""
        other = producer.input[1 - const]
        if len(g.consumers.get(other, [])) != 1 or other in g.outputs:
            return None, "comes from an Add whose other input is used elsewhere too"
        deeper, why = _absorbers(g, other)
        if deeper is None:
            return None, f"comes from an Add of something that {why}"
        return deeper + ((producer, const, None),), ""
    return None, f"comes from {op}, which cannot absorb a per-channel scale"


def _dims(inits, name: str) -> tuple[int, ...] | None:
    tensor = inits.get(name)
    return None if tensor is None else tuple(tensor.dims)


def smooth(model: onnx.ModelProto, stats: Mapping[str, np.ndarray],
           alpha: float = 0.5) -> tuple[onnx.ModelProto, list[str]]:
    """A copy of `model` with each smoothable activation in `stats` (name -> max|x| per
    channel of its last axis) scaled down by s and its weights up (see the module's text),
    and notes: what was smoothed and each MatMul/Gemm that was not, with the reason."""
    if not 0 <= alpha <= 1:
        raise ValueError(f"smoothing alpha must be in [0, 1], not {alpha}")
    out = onnx.ModelProto()
    out.CopyFrom(model)
    found, notes = sites(out)
    tensors = _Tensors(out)
    done = []
    for site in found:
        peak = stats.get(site.activation)
        if peak is None:
            notes.append(f"smooth: {site.activation!r} not smoothed: no per-channel statistics")
            continue
        if not isinstance(peak, np.ndarray):
            raise TypeError(f"smooth needs per-channel max|x| arrays, got {type(peak).__name__} "
                            f"for {site.activation!r}")
        weights = [tensors.read(node.input[i]) for node, i, _ in site.consumers]
        if any(w is None for w in weights):
            notes.append(f"smooth: {site.activation!r} not smoothed: a weight is external data "
                         "not loaded")
            continue
        rows = [np.abs(w).max(axis=0 if t else 1) for w, (_, _, t) in zip(weights, site.consumers)]
        if any(r.shape != peak.shape for r in rows):
            notes.append(f"smooth: {site.activation!r} not smoothed: its {peak.size} channels do "
                         f"not match the weights' {rows[0].size} inputs")
            continue
        s = _factors(np.asarray(peak, np.float64), np.max(rows, axis=0), alpha)
        if not tensors.scale_all(site, s):
            notes.append(f"smooth: {site.activation!r} not smoothed: a constant in front of it "
                         "is external data or not per-channel")
            continue
        done.append(site.activation)
    if done:
        notes.insert(0, f"smooth: {len(done)} activation{'s' if len(done) != 1 else ''} "
                        f"smoothed (alpha {alpha}): {', '.join(done)}")
    return out, notes


def _factors(peak: np.ndarray, rows: np.ndarray, alpha: float) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        s = peak ** alpha / rows.astype(np.float64) ** (1 - alpha)
    s = np.where((peak > 0) & (rows > 0) & np.isfinite(s), s, 1.0)
    return np.clip(s, MIN_SCALE, MAX_SCALE)


class _Tensors:
    """The graph's initializers, changed in place when one node uses them and copied under
    a new name for that node otherwise."""

    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        self.graph = graph
        self.taken = used_names(model)
        self.inits = {t.name: t for t in graph.initializer}
        self.uses: dict[str, int] = {}
        for node in graph.node:
            for name in node.input:
                self.uses[name] = self.uses.get(name, 0) + 1
        for value in graph.output:
            self.uses[value.name] = self.uses.get(value.name, 0) + 1

    def read(self, name: str) -> np.ndarray | None:
        tensor = self.inits[name]
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            return None
        return numpy_helper.to_array(tensor)

    def scale_all(self, site: Site, s: np.ndarray) -> bool:
        """Divide the absorbers by s and multiply the consumers' weight rows by it."""
        changes = []
        for node, index, axis in site.absorbers:
            value = self.read(node.input[index])
            if value is None or (axis is None and value.shape != s.shape):
                return False
            shape = [1] * value.ndim
            shape[axis if axis is not None else 0] = s.size
            changes.append((node, index, value / s.reshape(shape)))
        for node, index, transposed in site.consumers:
            value = self.read(node.input[index])
            changes.append((node, index, value * (s[None, :] if transposed else s[:, None])))
        for node, index, value in changes:
            self._write(node, index, value)
        return True

    def _write(self, node: onnx.NodeProto, index: int, value: np.ndarray) -> None:
        name = node.input[index]
        old = self.inits[name]
        array = value.astype(numpy_helper.to_array(old).dtype)
        if self.uses.get(name, 0) == 1:
            old.CopyFrom(numpy_helper.from_array(array, name))
            return
        new = fresh_name(self.taken, name + "/smoothed")
        tensor = numpy_helper.from_array(array, new)
        self.graph.initializer.append(tensor)
        self.inits[new] = tensor
        self.uses[name] -= 1
        self.uses[new] = 1
        node.input[index] = new
