"""Encoded tensors as ONNX initializers and the nodes that decode them.

Each encoded tensor W becomes new initializers plus nodes whose final output
is named W, so every consumer (also in subgraphs) reads the decoded weight
without being rewritten:

- Quantized, 5-8 bits: INT8 codes -> DequantizeLinear (per tensor or per axis,
  opset 13; blocked, opset 21).
- Quantized, 2-4 bits: INT4 codes, two per byte, low nibble first ->
  DequantizeLinear (opset 21). 2- and 3-bit codes are stored as INT4: ONNX
  has no narrower type, and the report counts the bytes written.
- Sparse over Quantized: the same, with the pruned codes at the zero point.
- Sparse over a float tensor: dense zeros. (A `sparse_initializer` feeding
  MatMul/Conv fails onnx.checker's full check, which types it as a sparse
  tensor, so it is not used.)
- Scaled (fp16/bf16/fp8) and Palettized: see `onnx_cast` and `onnx_palette`.
- LowRank rewrites its consumer instead; see `onnx_lowrank`.

Every spec lists the initializers (`initializers`, role -> name) and nodes
(`nodes`) that hold the tensor, so readers can find, size and remove them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from compress_core.encoded import Dense, Encoded, LowRank, Palettized, Quantized, Scaled, Sparse
from compress_core.errors import ModelReadError, ModelWriteError
from compress_core.packing import pack_bits, to_signed, unpack_bits

FreshName = Callable[[str], str]


@dataclass
class Emitted:
    """What replaces one tensor: initializers, nodes (ending in the tensor's name), a spec."""

    initializers: list[onnx.TensorProto] = field(default_factory=list)
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    spec: dict[str, Any] = field(default_factory=dict)
    opset: int = 1

    @property
    def nbytes(self) -> int:
        return sum(_data_bytes(t) for t in self.initializers)


def required_opset(encoded: Encoded, dtype: np.dtype) -> int:
    """The lowest default-domain opset that can hold this encoding."""
    if isinstance(encoded, LowRank):
        return max(required_opset(encoded.left, dtype), required_opset(encoded.right, dtype))
    inner = encoded.values if isinstance(encoded, Sparse) else encoded
    if isinstance(inner, Scaled):
        from .onnx_cast import scaled_opset
        return scaled_opset(inner)
    if isinstance(inner, Palettized):
        from .onnx_palette import PALETTE_OPSET
        return PALETTE_OPSET
    q = _quantized(encoded)
    if q is None:
        return 1
    if q.bits <= 4 or q.granularity == "group":
        return 21
    if np.dtype(q.scale.dtype) != np.dtype(np.float32):
        return 19
    return 13


def emit(name: str, encoded: Encoded, fresh: FreshName,
         dtype: np.dtype = np.dtype(np.float32)) -> Emitted:
    """The ONNX form of one encoded tensor: nodes whose last output is `name`.

    `dtype` is the float type the consumers expect (the original tensor's).
    """
    q = _quantized(encoded)
    if q is not None:
        return _dequantize_linear(name, q, fresh, encoded)
    inner = encoded.values if isinstance(encoded, Sparse) else encoded
    if isinstance(inner, Dense):
        out = _pruned(name, encoded) if isinstance(encoded, Sparse) else _dense(name, inner)
    elif isinstance(inner, Scaled):
        from .onnx_cast import emit_scaled
        out = emit_scaled(name, inner, fresh, dtype)
    elif isinstance(inner, Palettized):
        from .onnx_palette import emit_palettized
        out = emit_palettized(name, inner, fresh)
    else:
        raise ModelWriteError(f"tensor {name!r}: no ONNX form for {encoded.describe()}")
    if isinstance(encoded, Sparse):
        out.spec["pattern"] = encoded.pattern
    return out


def _dense(name: str, dense: Dense) -> Emitted:
    """A plain initializer (a low-rank factor that no later stage changed)."""
    spec = {"layout": "dense", "initializers": {"values": name}, "nodes": []}
    return Emitted(initializers=[numpy_helper.from_array(np.ascontiguousarray(dense.array), name)],
                   spec=spec)


def _quantized(encoded: Encoded) -> Quantized | None:
    if isinstance(encoded, Quantized):
        return encoded
    if isinstance(encoded, Sparse) and isinstance(encoded.values, Quantized):
        return encoded.values
    return None


def _dequantize_linear(name: str, q: Quantized, fresh: FreshName, encoded: Encoded) -> Emitted:
    four = q.bits <= 4
    codes_name, scale_name = fresh(f"{name}_quantized"), fresh(f"{name}_scale")
    codes = _int_tensor(codes_name, q.codes, four)
    scale = numpy_helper.from_array(_scale_layout(q, q.scale), scale_name)
    out = Emitted(initializers=[codes, scale], opset=required_opset(q, q.scale.dtype))
    inputs = [codes_name, scale_name]
    tensors = {"codes": codes_name, "scale": scale_name}
    if q.zero_point is not None:
        zp_name = fresh(f"{name}_zero_point")
        out.initializers.append(_int_tensor(zp_name, _scale_layout(q, q.zero_point), four))
        inputs.append(zp_name)
        tensors["zero_point"] = zp_name
    attrs: dict[str, int] = {}
    if q.granularity == "channel":
        attrs["axis"] = q.channel_axis
    elif q.granularity == "group":
        attrs["axis"], attrs["block_size"] = q.block_axis, q.group_size
    node_name = fresh(f"{name}_DequantizeLinear")
    out.nodes.append(helper.make_node("DequantizeLinear", inputs, [name], name=node_name, **attrs))
    out.spec = {"layout": "dequantize-linear", "bits": q.bits, "granularity": q.granularity,
                "channel_axis": q.channel_axis, "block_axis": q.block_axis,
                "group_size": q.group_size, "initializers": tensors, "nodes": [node_name]}
    if isinstance(encoded, Sparse):
        out.spec["pattern"] = encoded.pattern
    return out


def _scale_layout(q: Quantized, values: np.ndarray) -> np.ndarray:
    """Scale/zero-point shape DequantizeLinear expects: scalar, 1-D per axis, or blocked."""
    if q.granularity == "tensor":
        return values.reshape(())
    if q.granularity == "channel":
        return values.reshape(-1)
    return values


def _int_tensor(name: str, codes: np.ndarray, four: bool) -> onnx.TensorProto:
    codes = np.asarray(codes, dtype=np.int8)
    if not four:
        return numpy_helper.from_array(codes, name)
    # INT4: two's-complement nibbles, element 0 in the low nibble of byte 0.
    raw = pack_bits((codes & 0x0F).astype(np.uint8), 4).tobytes()
    return helper.make_tensor(name, onnx.TensorProto.INT4, codes.shape, raw, raw=True)


def _pruned(name: str, sparse: Sparse) -> Emitted:
    dense = np.require(sparse.values.array, requirements="C")  # keeps a scalar 0-d
    spec = {"layout": "dense", "pattern": sparse.pattern}
    return Emitted(initializers=[numpy_helper.from_array(dense, name)], spec=spec)


def _data_bytes(tensor: onnx.TensorProto) -> int:
    if tensor.HasField("raw_data"):
        return len(tensor.raw_data)
    return numpy_helper.to_array(tensor).nbytes


def decode_spec(spec: dict[str, Any], initializers: dict[str, onnx.TensorProto],
                shape: tuple[int, ...]) -> Encoded:
    """Rebuild the encoded tree of a tensor from its spec and its initializers (by name)."""
    layout = spec["layout"]
    if layout == "dequantize-linear":
        return _decode_dequantize_linear(spec, initializers, shape)
    if layout == "dense":
        return Dense(numpy_helper.to_array(initializers[spec["initializers"]["values"]]))
    if layout == "cast":
        from .onnx_cast import decode_scaled
        return decode_scaled(spec, initializers, shape)
    if layout == "palettized":
        from .onnx_palette import decode_palettized
        return decode_palettized(spec, initializers, shape)
    if layout == "lowrank":
        left = decode_spec(spec["left"], initializers, tuple(spec["left"]["shape"]))
        right = decode_spec(spec["right"], initializers, tuple(spec["right"]["shape"]))
        return LowRank(left, right)
    raise ModelReadError(f"unknown modelpress ONNX layout {layout!r}; upgrade modelpress")


def spec_initializers(spec: dict[str, Any]) -> list[str]:
    """Every initializer name a spec (and its nested specs) owns."""
    names = list(spec.get("initializers", {}).values())
    for part in ("left", "right"):
        if part in spec:
            names += spec_initializers(spec[part])
    return names


def spec_nodes(spec: dict[str, Any]) -> list[str]:
    """Every node name a spec (and its nested specs) owns."""
    names = list(spec.get("nodes", []))
    for part in ("left", "right"):
        if part in spec:
            names += spec_nodes(spec[part])
    return names


def _decode_dequantize_linear(spec: dict[str, Any], initializers: dict[str, onnx.TensorProto],
                              shape: tuple[int, ...]) -> Quantized:
    t = spec["initializers"]
    bits, four = spec["bits"], spec["bits"] <= 4
    codes = _read_int(initializers[t["codes"]], four).reshape(shape)
    scale = numpy_helper.to_array(initializers[t["scale"]])
    zp = _read_int(initializers[t["zero_point"]], four) if "zero_point" in t else None
    rank = len(shape)
    if spec["granularity"] == "tensor":
        scale = scale.reshape((1,) * rank)
        zp = None if zp is None else zp.reshape((1,) * rank)
    elif spec["granularity"] == "channel":
        full = [1] * rank
        full[spec["channel_axis"]] = shape[spec["channel_axis"]]
        scale = scale.reshape(full)
        zp = None if zp is None else zp.reshape(full)
    else:
        zp = None if zp is None else zp.reshape(scale.shape)
    return Quantized(codes=codes, scale=scale, zero_point=zp, bits=bits,
                     granularity=spec["granularity"], channel_axis=spec["channel_axis"],
                     block_axis=spec["block_axis"], group_size=spec["group_size"])


def _read_int(tensor: onnx.TensorProto, four: bool) -> np.ndarray:
    if not four:
        return numpy_helper.to_array(tensor).astype(np.int8)
    count = int(np.prod(tensor.dims, dtype=np.int64))
    nibbles = unpack_bits(np.frombuffer(tensor.raw_data, dtype=np.uint8), 4, count)
    return to_signed((nibbles ^ 0x08), 4).reshape(tuple(tensor.dims))
