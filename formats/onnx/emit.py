"""Encoded tensors as ONNX initializers and the nodes that decode them.

Each encoded tensor W becomes new initializers plus nodes whose final output
is named W, so every consumer (also in subgraphs) reads the decoded weight
without being rewritten:

- Quantized (also under a prune mask, pruned codes at the zero point): see
  `onnx_quant`. Here, and for low-rank factors, the folded chain (codes
  -> Cast -> Sub -> Mul, constant-folded by onnxruntime at load); the
  writer gives 4-bit MatMul/Gemm weights onnxruntime's 4-bit kernel form.
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

from modelpress.core.encoded import (Dense, Encoded, LowRank, Palettized, Quantized, Scaled, Sparse, quantized_part)
from modelpress.core.errors import ModelReadError, ModelWriteError

FreshName = Callable[[str], str]


@dataclass
class Emitted:
    """What replaces one tensor: initializers, nodes (ending in the tensor's name), a spec."""

    initializers: list[onnx.TensorProto] = field(default_factory=list)
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    spec: dict[str, Any] = field(default_factory=dict)
    opset: int = 1
    functions: list[onnx.FunctionProto] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(_data_bytes(t) for t in self.initializers)


def required_opset(encoded: Encoded, dtype: np.dtype) -> int:
    """The lowest default-domain opset that can hold this encoding."""
    if isinstance(encoded, LowRank):
        return max(required_opset(encoded.left, dtype), required_opset(encoded.right, dtype))
    inner = encoded.values if isinstance(encoded, Sparse) else encoded
    if isinstance(inner, Scaled):
        from modelpress.formats.onnx.cast import scaled_opset
        return scaled_opset(inner)
    if isinstance(inner, Palettized):
        from modelpress.formats.onnx.palette import PALETTE_OPSET
        return PALETTE_OPSET
    q = quantized_part(encoded)
    if q is None:
        return 1
    from modelpress.formats.onnx.quant import form_opset
    return form_opset("quantized", q)


def emit(name: str, encoded: Encoded, fresh: FreshName,
         dtype: np.dtype = np.dtype(np.float32), opset: int = 21) -> Emitted:
    """The ONNX form of one encoded tensor: nodes whose last output is `name`.

    `dtype` is the float type the consumers expect (the original tensor's);
    `opset` the model's default-domain opset (decode functions import it).
    """
    q = quantized_part(encoded)
    if q is not None:
        from modelpress.formats.onnx.quant import emit_folded
        out = emit_folded(name, encoded, fresh, dtype, opset)
        if isinstance(encoded, Sparse):
            out.spec["pattern"] = encoded.pattern
        return out
    inner = encoded.values if isinstance(encoded, Sparse) else encoded
    if isinstance(inner, Dense):
        out = _pruned(name, encoded) if isinstance(encoded, Sparse) else _dense(name, inner)
    elif isinstance(inner, Scaled):
        from modelpress.formats.onnx.cast import emit_scaled
        out = emit_scaled(name, inner, fresh, dtype)
    elif isinstance(inner, Palettized):
        from modelpress.formats.onnx.palette import emit_palettized
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
    if layout in ("quantized", "dequantize-linear", "matmul-nbits"):
        from modelpress.formats.onnx.quant import decode_quantized
        return decode_quantized(spec, initializers, shape)
    if layout == "dense":
        return Dense(numpy_helper.to_array(initializers[spec["initializers"]["values"]]))
    if layout == "cast":
        from modelpress.formats.onnx.cast import decode_scaled
        return decode_scaled(spec, initializers, shape)
    if layout == "palettized":
        from modelpress.formats.onnx.palette import decode_palettized
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
