"""Read back the weights an ONNX model's MatMul/Gemm/Conv/Gather nodes actually use, for any tool.

A weight is identified by the output name of the node that consumes it (every tool measured keeps
those names: modelpress rewrites only initializers, onnxruntime and NNCF replace a MatMul by a chain
or a contrib op that ends in the same output). In a compressed model the consumer of a weight is
found from that output, walking back a few nodes (onnxruntime's MatMulInteger -> Cast -> Mul).

Weights are returned in one canonical layout per kind so that tools that transpose can be compared:
matrix weights as [K, N] (what a MatMul multiplies by), Conv kernels and embedding tables as stored.
Constant subgraphs (modelpress's decode chains, NNCF's and onnxruntime's DequantizeLinear) are
evaluated by onnxruntime with graph optimizations off, so the values are those the runtime computes;
numpy takes over for the few forms onnxruntime refuses (NNCF's Conv scales shaped [O, 1, 1]).
MatMulNBits and MatMulInteger/ConvInteger are decoded from their packed inputs.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

# consumer op -> index of its weight input
WEIGHT_INPUT = {"MatMul": 1, "Gemm": 1, "Conv": 1, "ConvTranspose": 1, "Gather": 0,
                "MatMulNBits": 1, "MatMulInteger": 1, "ConvInteger": 1}
# what an original consumer may have become in a compressed model
_BECOMES = {"MatMul": {"MatMul", "Gemm", "MatMulNBits", "MatMulInteger"},
            "Gemm": {"Gemm", "MatMul", "MatMulNBits", "MatMulInteger"},
            "Conv": {"Conv", "ConvInteger"}, "ConvTranspose": {"ConvTranspose"},
            "Gather": {"Gather"}}
_MAX_DEPTH = 4  # nodes between a consumer's output and the op holding the weight
_FLOATS = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}
_SUBBYTE_BITS = {getattr(TensorProto, name): bits  # the 2-bit types exist in newer onnx only
                 for name, bits in (("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2),
                                    ("UINT2", 2)) if hasattr(TensorProto, name)}


@dataclass
class WeightRead:
    """One weight as a model stores it: canonical float32 values, the constant tensors holding
    it (initializers or Constant outputs), how it was read, or why it could not be."""

    op: str
    values: np.ndarray | None
    tensors: frozenset[str] = frozenset()
    form: str = ""
    problem: str | None = None


@dataclass
class ModelWeights:
    """The weights of one model by consumer output name, and the payload bytes of the constant
    tensors that hold them."""

    weights: dict[str, WeightRead] = field(default_factory=dict)
    tensor_bytes: dict[str, int] = field(default_factory=dict)

    def storage_bytes(self, keys: Iterable[str]) -> int:
        """Payload bytes of the tensors holding these weights, each tensor counted once."""
        names = set().union(*(self.weights[k].tensors for k in keys)) if keys else set()
        return sum(self.tensor_bytes.get(n, 0) for n in names)


def payload_bytes(tensor: TensorProto) -> int:
    """Bytes of a tensor's data as stored (sub-byte types packed), without name or dims."""
    if tensor.data_location == TensorProto.EXTERNAL:
        entries = {e.key: e.value for e in tensor.external_data}
        if "length" in entries:
            return int(entries["length"])
    elif tensor.raw_data:
        return len(tensor.raw_data)
    count = math.prod(tensor.dims)
    if tensor.data_type in _SUBBYTE_BITS:
        return -(-count * _SUBBYTE_BITS[tensor.data_type] // 8)
    if tensor.data_type == TensorProto.STRING:
        return sum(len(s) for s in tensor.string_data)
    return count * np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize


class GraphIndex:
    """Producers, constants and tensor values of a model's main graph."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        graph = model.graph
        self.initializers = {t.name: t for t in graph.initializer}
        self.producer = {o: n for n in graph.node for o in n.output if o}
        self.order = {id(n): i for i, n in enumerate(graph.node)}
        self._constant: dict[str, bool] = {}

    def is_constant(self, name: str) -> bool:
        """True if the tensor depends on initializers and Constant nodes only."""
        if name in self._constant:
            return self._constant[name]
        stack, seen = [name], []
        while stack:  # iterative post-order: chains of decode nodes can be long
            cur = stack[-1]
            if cur in self._constant:
                stack.pop()
                continue
            if cur in self.initializers:
                self._constant[cur] = True
                stack.pop()
                continue
            node = self.producer.get(cur)
            if node is None or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                                   for a in node.attribute):
                self._constant[cur] = False
                stack.pop()
                continue
            pending = [i for i in node.input if i and i not in self._constant]
            if pending and cur not in seen:
                seen.append(cur)
                stack.extend(pending)
                continue
            self._constant[cur] = all(self._constant.get(i, False) for i in node.input if i)
            stack.pop()
        return self._constant[name]

    def leaves(self, name: str) -> set[str]:
        """Initializers and Constant-node outputs a constant tensor is computed from."""
        found, stack, seen = set(), [name], set()
        while stack:
            cur = stack.pop()
            if cur in seen or not cur:
                continue
            seen.add(cur)
            if cur in self.initializers:
                found.add(cur)
                continue
            node = self.producer.get(cur)
            if node is None:
                continue
            if node.op_type == "Constant":
                found.add(cur)
            stack.extend(node.input)
        return found

    def subgraph(self, names: Iterable[str]) -> list[onnx.NodeProto]:
        """The nodes computing these constant tensors, in graph order."""
        nodes, stack, seen = {}, list(names), set()
        while stack:
            cur = stack.pop()
            if cur in seen or not cur or cur in self.initializers:
                continue
            seen.add(cur)
            node = self.producer.get(cur)
            if node is not None:
                nodes[id(node)] = node
                stack.extend(node.input)
        return sorted(nodes.values(), key=lambda n: self.order[id(n)])

    def leaf_bytes(self, name: str) -> int:
        """Payload bytes of an initializer or a Constant node's value."""
        if name in self.initializers:
            return payload_bytes(self.initializers[name])
        value = _constant_value(self.producer[name])
        return int(value.nbytes)

    def leaf_value(self, name: str) -> np.ndarray:
        """Value of an initializer or Constant output."""
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        return _constant_value(self.producer[name])


def _constant_value(node: onnx.NodeProto) -> np.ndarray:
    for attr in node.attribute:
        value = helper.get_attribute_value(attr)
        if isinstance(value, TensorProto):
            return numpy_helper.to_array(value)
        return np.asarray(value, np.float32 if "float" in attr.name else np.int64)
    raise ValueError(f"Constant node {node.name!r} has no value")


def attr(node: onnx.NodeProto, name: str, default):
    """An attribute's value, or the default."""
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def weight_consumers(model: onnx.ModelProto) -> dict[str, str]:
    """Consumer output name -> op type, for every MatMul/Gemm/Conv/ConvTranspose/Gather whose
    weight input is a constant floating-point tensor of rank >= 2 (main graph only)."""
    index = GraphIndex(model)
    out = {}
    for node in model.graph.node:
        if node.op_type not in _BECOMES or len(node.input) <= WEIGHT_INPUT[node.op_type]:
            continue
        name = node.input[WEIGHT_INPUT[node.op_type]]
        if not node.output or not node.output[0] or not index.is_constant(name):
            continue
        if not _is_float_matrix(index, name):
            continue
        out[node.output[0]] = node.op_type
    return out


def _is_float_matrix(index: GraphIndex, name: str) -> bool:
    if name in index.initializers:
        t = index.initializers[name]
        return t.data_type in _FLOATS and len(t.dims) >= 2
    node = index.producer[name]
    if node.op_type == "Constant":
        value = _constant_value(node)
        return value.dtype.kind == "f" and value.ndim >= 2
    return True  # computed (a decode chain): checked when evaluated


def read_weights(model: onnx.ModelProto, consumers: dict[str, str]) -> ModelWeights:
    """The weights this model uses at each of `consumers` (output name -> original op type)."""
    index = GraphIndex(model)
    found = {key: _find_holder(index, key, op) for key, op in consumers.items()}
    to_eval = set()
    for key, hit in found.items():
        if isinstance(hit, tuple):
            node, _ = hit
            to_eval.update(_constant_inputs(index, node))
    values, errors = _evaluate(index, to_eval)
    result = ModelWeights()
    for key, hit in found.items():
        op = consumers[key]
        if isinstance(hit, str):
            result.weights[key] = WeightRead(op, None, problem=hit)
            continue
        node, path = hit
        try:
            result.weights[key] = _decode(index, node, path, values, errors, op)
        except (ValueError, KeyError, IndexError) as exc:
            result.weights[key] = WeightRead(op, None, problem=f"{node.op_type}: {exc}")
    for read in result.weights.values():
        for name in read.tensors:
            if name not in result.tensor_bytes:
                result.tensor_bytes[name] = index.leaf_bytes(name)
    return result


def _find_holder(index: GraphIndex, key: str, op: str):
    """(node holding the weight, path of nodes from the consumer output to it) or a problem."""
    start = index.producer.get(key)
    if start is None:
        return f"no node produces {key!r}"
    queue = deque([(start, [start])])
    seen = set()
    while queue:
        node, path = queue.popleft()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if node.op_type in _BECOMES[op]:
            w = WEIGHT_INPUT[node.op_type]
            if len(node.input) > w and index.is_constant(node.input[w]):
                return node, path
        if len(path) > _MAX_DEPTH:
            continue
        for name in node.input:
            parent = index.producer.get(name) if name else None
            if parent is not None and not index.is_constant(name):
                queue.append((parent, path + [parent]))
    return f"no {'/'.join(sorted(_BECOMES[op]))} node found before {key!r}"


def _constant_inputs(index: GraphIndex, node: onnx.NodeProto) -> list[str]:
    """The constant inputs of a weight-holding node that are computed by nodes."""
    if node.op_type == "MatMulNBits":
        names = node.input[1:4]
    elif node.op_type in ("MatMulInteger", "ConvInteger"):
        names = [node.input[1]] + list(node.input[3:4])
    else:
        names = [node.input[WEIGHT_INPUT[node.op_type]]]
    return [n for n in names if n and n not in index.initializers
            and index.producer[n].op_type != "Constant"]


def _value(index: GraphIndex, name: str, values: dict[str, np.ndarray]) -> np.ndarray:
    if name in values:
        return values[name]
    return index.leaf_value(name)


def _decode(index: GraphIndex, node: onnx.NodeProto, path: list[onnx.NodeProto],
            values: dict[str, np.ndarray], errors: dict[str, str], op: str) -> WeightRead:
    kind = node.op_type
    if kind == "MatMulNBits":
        ins = [n for n in node.input[1:4] if n]
        arrays = [_value(index, n, values) for n in ins]
        zp = arrays[2] if len(node.input) > 3 and node.input[3] else None
        w = decode_matmul_nbits(arrays[0], arrays[1], zp, K=attr(node, "K", 0), N=attr(node, "N", 0),
                                bits=attr(node, "bits", 4), block_size=attr(node, "block_size", 0))
        return WeightRead(op, w, _leaves(index, ins), "MatMulNBits")
    if kind in ("MatMulInteger", "ConvInteger"):
        q = _value(index, node.input[1], values)
        zp_name = node.input[3] if len(node.input) > 3 else ""
        zp = _value(index, zp_name, values) if zp_name else None
        scale, scale_names = _weight_scale(index, path)
        if scale is None:
            raise ValueError("no constant weight scale found after the integer op")
        w = dequantize_integer(q, zp, scale, conv=kind == "ConvInteger")
        return WeightRead(op, w, _leaves(index, [node.input[1], zp_name, *scale_names]), kind)
    name = node.input[WEIGHT_INPUT[kind]]
    if name in errors:
        raise ValueError(errors[name])
    raw = np.asarray(_value(index, name, values))
    form = "initializer" if name in index.initializers else "computed"
    names = [name]
    if raw.dtype.kind in "iu":  # integer table gathered, then dequantized (onnxruntime's Gather)
        raw, dq_names = _dequantize_after(index, raw, path)
        names += dq_names
        form = f"{kind} -> DequantizeLinear"
    w = raw.astype(np.float32)
    if kind == "Gemm" and attr(node, "transB", 0):
        w = w.T
    return WeightRead(op, np.ascontiguousarray(w), _leaves(index, names), form)


def _dequantize_after(index: GraphIndex, table: np.ndarray, path: list[onnx.NodeProto]):
    """An integer weight whose consumer's output is dequantized on the way (Gather -> DQ): the
    table dequantized with that DequantizeLinear's constant scale (per tensor or per last axis)."""
    for node in path:
        if node.op_type != "DequantizeLinear" or not all(
                index.is_constant(n) for n in node.input[1:] if n):
            continue
        scale = index.leaf_value(node.input[1]).astype(np.float32)
        zp = (index.leaf_value(node.input[2]).astype(np.float32)
              if len(node.input) > 2 and node.input[2] else np.zeros_like(scale))
        if scale.size not in (1, table.shape[-1]):
            raise ValueError(f"DequantizeLinear scale of size {scale.size} after an integer table")
        shape = () if scale.size == 1 else (table.shape[-1],)
        w = (table.astype(np.float32) - zp.reshape(shape)) * scale.reshape(shape)
        return w, [n for n in node.input[1:] if n]
    raise ValueError("integer weight without a DequantizeLinear after it")


def _leaves(index: GraphIndex, names: Iterable[str]) -> frozenset[str]:
    out: set[str] = set()
    for n in names:
        if n:
            out |= index.leaves(n)
    return frozenset(out)


def _weight_scale(index: GraphIndex, path: list[onnx.NodeProto]):
    """Product of the constant factors multiplied into an integer op's result on its way to the
    consumer output (onnxruntime: Mul(Cast(MatMulInteger), Mul(x_scale, w_scale)))."""
    on_path = {o for n in path for o in n.output}
    factors, names = [], []
    for node in path:
        if node.op_type != "Mul":
            continue
        for name in node.input:
            if name in on_path:
                continue
            found = _constant_factors(index, name)
            factors += [f for f, _ in found]
            names += [n for _, n in found]
    if not factors:
        return None, []
    scale = factors[0].astype(np.float32)
    for f in factors[1:]:
        scale = scale * f.astype(np.float32)
    return scale, names


def _constant_factors(index: GraphIndex, name: str, depth: int = 0) -> list[tuple[np.ndarray, str]]:
    if index.is_constant(name):
        if name in index.initializers or index.producer[name].op_type == "Constant":
            return [(index.leaf_value(name), name)]
        return []
    node = index.producer.get(name)
    if node is None or node.op_type != "Mul" or depth > 2:
        return []
    return [f for i in node.input for f in _constant_factors(index, i, depth + 1)]


def _evaluate(index: GraphIndex, names: set[str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Values of computed constant tensors: onnxruntime first (all at once), numpy per tensor
    where onnxruntime refuses; and for each tensor neither can compute, why."""
    if not names:
        return {}, {}
    wanted = sorted(names)
    try:
        return dict(zip(wanted, _ort_evaluate(index, wanted))), {}
    except Exception as exc:  # onnxruntime's own exception types; fall back tensor by tensor
        first = first_line(exc)
    values, errors = {}, {}
    for name in wanted:
        try:
            values[name] = numpy_evaluate(index, name)
        except (ValueError, KeyError, NotImplementedError) as exc:
            try:
                values[name] = _ort_evaluate(index, [name])[0]
            except Exception:  # noqa: BLE001 - reported in the table
                errors[name] = f"onnxruntime: {first}; numpy: {exc}"
    return values, errors


def first_line(exc: BaseException, limit: int = 160) -> str:
    """An exception's first non-empty line, shortened: what a table cell can hold."""
    for line in str(exc).splitlines():
        if line.strip():
            text = f"{type(exc).__name__}: {line.strip()}"
            return text if len(text) <= limit else text[:limit - 3] + "..."
    return type(exc).__name__


def _ort_evaluate(index: GraphIndex, names: list[str]) -> list[np.ndarray]:
    import onnxruntime as ort

    nodes = index.subgraph(names)
    needed = {i for n in nodes for i in n.input if i}
    inits = [t for name, t in index.initializers.items() if name in needed or name in names]
    outputs = [helper.make_tensor_value_info(n, TensorProto.UNDEFINED, None) for n in names]
    graph = helper.make_graph(nodes, "weights", [], outputs, inits)
    # Decode chains may call model-local functions (modelpress writes them): carry them along.
    model = helper.make_model(graph, opset_imports=index.model.opset_import,
                              functions=index.model.functions)
    model.ir_version = index.model.ir_version
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    types.update({v.name: v.type.tensor_type.elem_type for v in inferred.graph.output})
    for out in model.graph.output:
        out.type.tensor_type.elem_type = types.get(out.name) or TensorProto.FLOAT
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 4
    session = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    ort.set_default_logger_severity(4)  # a refusal falls back to numpy: no error log line
    quiet = ort.RunOptions()
    quiet.log_severity_level = 4
    return [np.asarray(v, np.float32) for v in session.run(names, {}, quiet)]


def numpy_evaluate(index: GraphIndex, name: str) -> np.ndarray:
    """A computed constant in numpy (Identity, Transpose, Reshape, Cast, Mul, DequantizeLinear)."""
    if name in index.initializers or index.producer[name].op_type == "Constant":
        return index.leaf_value(name)
    node = index.producer[name]
    ins = [numpy_evaluate(index, i) if i else None for i in node.input]
    kind = node.op_type
    if kind == "Identity":
        return ins[0]
    if kind == "Transpose":
        return np.transpose(ins[0], attr(node, "perm", None))
    if kind == "Reshape":
        shape = [d if d != 0 else ins[0].shape[i] for i, d in enumerate(ins[1].tolist())]
        return ins[0].reshape(shape)
    if kind == "Cast":
        return ins[0].astype(helper.tensor_dtype_to_np_dtype(attr(node, "to", TensorProto.FLOAT)))
    if kind == "Mul":
        return ins[0] * ins[1]
    if kind == "DequantizeLinear":
        return dequantize_linear(ins[0], ins[1], ins[2] if len(ins) > 2 else None,
                                 axis=attr(node, "axis", 1), block_size=attr(node, "block_size", 0))
    raise NotImplementedError(f"op {kind} not evaluated in numpy")


def dequantize_linear(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray | None,
                      axis: int = 1, block_size: int = 0) -> np.ndarray:
    """DequantizeLinear: per tensor, per axis or blocked along `axis`. A per-axis scale stored with
    extra unit dimensions (NNCF's [O, 1, 1] for a Conv kernel) is read as the per-axis vector."""
    x = np.asarray(x).astype(np.float32)
    scale = np.asarray(scale, np.float32)
    zp = np.zeros_like(scale) if zero_point is None else np.asarray(zero_point).astype(np.float32)
    axis = axis % x.ndim
    if scale.size == 1:
        return (x - zp.reshape(())) * scale.reshape(())
    if block_size:
        scale = np.repeat(scale, block_size, axis=axis).take(range(x.shape[axis]), axis=axis)
        zp = np.repeat(zp, block_size, axis=axis).take(range(x.shape[axis]), axis=axis)
        return (x - zp) * scale
    if scale.size == x.shape[axis]:
        shape = [1] * x.ndim
        shape[axis] = -1
        return (x - zp.reshape(shape)) * scale.reshape(shape)
    raise ValueError(f"scale shape {scale.shape} does not fit data {x.shape} on axis {axis}")


def dequantize_integer(q: np.ndarray, zero_point: np.ndarray | None, scale: np.ndarray,
                       conv: bool) -> np.ndarray:
    """Weights of MatMulInteger ([K, N], per column) or ConvInteger ([O, ...], per output channel)."""
    q = np.asarray(q).astype(np.float32)
    zp = np.zeros(1, np.float32) if zero_point is None else np.asarray(zero_point, np.float32)
    scale = np.asarray(scale, np.float32)
    if conv:
        shape = (-1,) + (1,) * (q.ndim - 1)
        zp = zp.reshape(shape) if zp.size > 1 else zp.reshape(())
        scale = scale.reshape(shape) if scale.size > 1 else scale.reshape(())
        return (q - zp) * scale
    zp = zp.reshape(-1) if zp.size > 1 else zp.reshape(())
    scale = scale.reshape(-1) if scale.size > 1 else scale.reshape(())
    return ((q - zp) * scale).astype(np.float32)


def _unpack(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Codes packed low-first along the last axis, `count` per row."""
    per_byte = 8 // bits
    shifts = (np.arange(per_byte, dtype=np.uint8) * bits)
    codes = (packed[..., None] >> shifts) & np.uint8((1 << bits) - 1)
    codes = codes.reshape(packed.shape[:-1] + (-1,))
    return codes[..., :count]


def decode_matmul_nbits(b: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, *,
                        K: int, N: int, bits: int, block_size: int) -> np.ndarray:
    """com.microsoft.MatMulNBits weight as [K, N]: B [N, k_blocks, blob] codes packed low-first,
    scales [N * k_blocks], zero points packed uint8 (default 2^(bits-1)) or float like the scales.
    Unpacked uint8 zero points [N, k_blocks] (what NNCF 3.4 writes) are read as such."""
    kb = -(-K // block_size)
    codes = _unpack(np.asarray(b, np.uint8).reshape(N, kb, -1), bits, block_size)
    codes = codes.reshape(N, kb, block_size).astype(np.float32)
    s = np.asarray(scales, np.float32).reshape(N, kb)
    if zero_points is None:
        z = np.full((N, kb), 2 ** (bits - 1), np.float32)
    elif zero_points.dtype == np.uint8 and zero_points.size == N * -(-kb * bits // 8) \
            and not (zero_points.size == N * kb and bits == 8):
        z = _unpack(zero_points.reshape(N, -1), bits, kb).astype(np.float32)
    elif zero_points.size == N * kb:
        z = np.asarray(zero_points, np.float32).reshape(N, kb)
    else:
        raise ValueError(f"zero points of size {zero_points.size} fit neither packed nor "
                         f"unpacked layout for N={N}, {kb} blocks")
    w = ((codes - z[:, :, None]) * s[:, :, None]).reshape(N, kb * block_size)[:, :K]
    return np.ascontiguousarray(w.T)
