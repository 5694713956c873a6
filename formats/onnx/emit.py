"""Encoded tensors as ONNX initializers and the nodes that decode them.

Each encoded tensor W becomes new initializers plus nodes whose final output
is named W, so every consumer (also in subgraphs) reads the decoded weight
without being rewritten:

- Quantized (also under a prune mask, pruned codes at the zero point): see
  `quant`. Here, and for low-rank factors, the folded chain (codes
  -> Cast -> Sub -> Mul, constant-folded by onnxruntime at load); the
  writer gives 4-bit MatMul/Gemm weights onnxruntime's 4-bit kernel form.
- Sparse over a float tensor: dense zeros. (A `sparse_initializer` feeding
  MatMul/Conv fails onnx.checker's full check, which types it as a sparse
  tensor, so it is not used.)
- Scaled (fp16/bf16/fp8) and Palettized: see `cast` and `palette`.
- LowRank rewrites its consumer instead; see `lowrank`.

Every spec lists the initializers (`initializers`, role -> name) and nodes
(`nodes`) that hold the tensor, so readers can find, size and remove them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from modelpress.core.encoded import (Dense, Encoded, LowRank, Palettized, Scaled, Sparse, quantized_part)
from modelpress.core.errors import ModelReadError, ModelWriteError

from modelpress.formats.onnx.cast import decode_scaled, emit_scaled, scaled_opset
from modelpress.formats.onnx.emitted import Emitted, FreshName
from modelpress.formats.onnx.palette import PALETTE_OPSET, decode_palettized, emit_palettized
from modelpress.formats.onnx.quant import emit_folded, form_opset
from modelpress.formats.onnx.quant_read import decode_quantized


def required_opset(encoded: Encoded, dtype: np.dtype) -> int:
    """The lowest default-domain opset that can hold this encoding."""
    if isinstance(encoded, LowRank):
        return max(required_opset(encoded.left, dtype), required_opset(encoded.right, dtype))
    inner = encoded.values if isinstance(encoded, Sparse) else encoded
    if isinstance(inner, Scaled):
        return scaled_opset(inner)
    if isinstance(inner, Palettized):
        return PALETTE_OPSET
    q = quantized_part(encoded)
    if q is None:
        return 1
    return form_opset("quantized", q)


def emit(name: str, encoded: Encoded, fresh: FreshName,
         dtype: np.dtype = np.dtype(np.float32), opset: int = 21) -> Emitted:
    """The ONNX form of one encoded tensor: nodes whose last output is `name`.

    `dtype` is the float type the consumers expect (the original tensor's);
    `opset` the model's default-domain opset (decode functions import it).
    """
    q = quantized_part(encoded)
    if q is not None:
        out = emit_folded(name, encoded, fresh, dtype, opset)
        if isinstance(encoded, Sparse):
            out.spec["pattern"] = encoded.pattern
        return out
    inner = encoded.values if isinstance(encoded, Sparse) else encoded
    if isinstance(inner, Dense):
        out = _pruned(name, encoded) if isinstance(encoded, Sparse) else _dense(name, inner)
    elif isinstance(inner, Scaled):
        out = emit_scaled(name, inner, fresh, dtype)
    elif isinstance(inner, Palettized):
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


def decode_spec(spec: dict[str, Any], initializers: dict[str, onnx.TensorProto],
                shape: tuple[int, ...]) -> Encoded:
    """Rebuild the encoded tree of a tensor from its spec and its initializers (by name)."""
    layout = spec["layout"]
    if layout in ("quantized", "dequantize-linear", "matmul-nbits"):
        return decode_quantized(spec, initializers, shape)
    if layout == "dense":
        return Dense(numpy_helper.to_array(initializers[spec["initializers"]["values"]]))
    if layout == "cast":
        return decode_scaled(spec, initializers, shape)
    if layout == "palettized":
        return decode_palettized(spec, initializers, shape)
    if layout == "lowrank":
        left = decode_spec(spec["left"], initializers, tuple(spec["left"]["shape"]))
        right = decode_spec(spec["right"], initializers, tuple(spec["right"]["shape"]))
        return LowRank(left, right)
    raise ModelReadError(f"unknown modelpress ONNX layout {layout!r}; upgrade modelpress")
