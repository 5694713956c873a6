"""Low-precision float weights (Scaled) in ONNX.

- fp16/bf16 without a scale: the initializer in that type and a `Cast` to
  the type the consumers expect. onnxruntime folds the Cast at load, so the
  model runs as fast as the original and the file is half the size.
- fp16/bf16 with a scale: `Cast` then `Mul` by the scale (also folded).
- fp8 (e4m3fn, e5m2): the same `Cast` (from FLOAT8E4M3FN / FLOAT8E5M2,
  opset 19) then `Mul` by the scale. onnxruntime folds both at load, so fp8
  weights run at float speed (a DequantizeLinear would run at every call:
  measured 15x slower on an MLP).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from modelpress.core.dtypes import BFLOAT16, FLOAT8_E4M3, FLOAT8_E5M2, short_name
from modelpress.core.encoded import Scaled

from modelpress.formats.onnx.emitted import Emitted, FreshName

_FP8 = {FLOAT8_E4M3: onnx.TensorProto.FLOAT8E4M3FN, FLOAT8_E5M2: onnx.TensorProto.FLOAT8E5M2}
_HALF = {np.dtype(np.float16): onnx.TensorProto.FLOAT16, BFLOAT16: onnx.TensorProto.BFLOAT16}


def scaled_opset(scaled: Scaled) -> int:
    """Lowest opset for the form: Cast from fp8 needs 19, from bf16 13."""
    if scaled.dtype in _FP8:
        return 19
    return 13 if scaled.dtype == BFLOAT16 else 1


def emit_scaled(name: str, scaled: Scaled, fresh: FreshName, dtype: np.dtype) -> Emitted:
    """Initializers and nodes producing `name` (of `dtype`) from low-precision values."""
    values_name = fresh(f"{name}_{short_name(scaled.dtype).replace('-', '_')}")
    values = _tensor(values_name, scaled.values)
    out = Emitted(initializers=[values], opset=scaled_opset(scaled))
    tensors = {"values": values_name}
    nodes: list[str] = []
    to = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    cast_out = name if scaled.scale is None else fresh(f"{name}_unscaled")
    node = fresh(f"{name}_Cast")
    out.nodes.append(helper.make_node("Cast", [values_name], [cast_out], name=node, to=to))
    nodes.append(node)
    if scaled.scale is not None:
        scale_name = fresh(f"{name}_scale")
        # Same rank as the weight, so Mul broadcasts it along the channel axis.
        scale = np.ascontiguousarray(scaled.scale.astype(dtype))
        out.initializers.append(numpy_helper.from_array(scale, scale_name))
        tensors["scale"] = scale_name
        node = fresh(f"{name}_Mul")
        out.nodes.append(helper.make_node("Mul", [cast_out, scale_name], [name], name=node))
        nodes.append(node)
    out.spec = {"layout": "cast", "stored": short_name(scaled.dtype),
                "channel_axis": scaled.channel_axis, "scaled": scaled.scale is not None,
                "initializers": tensors, "nodes": nodes}
    return out


def decode_scaled(spec: dict[str, Any], initializers: dict[str, onnx.TensorProto],
                  shape: tuple[int, ...]) -> Scaled:
    """Rebuild a Scaled node from the initializers `emit_scaled` wrote."""
    t = spec["initializers"]
    values = numpy_helper.to_array(initializers[t["values"]]).reshape(shape)
    if "scale" not in t:
        return Scaled(values)
    scale = numpy_helper.to_array(initializers[t["scale"]])
    axis = spec["channel_axis"]
    full = [1] * len(shape)
    if axis is not None:
        full[axis] = shape[axis]
    return Scaled(values, scale.reshape(full), axis)


def _tensor(name: str, values: np.ndarray) -> onnx.TensorProto:
    dtype = values.dtype
    code = _FP8.get(dtype) or _HALF.get(dtype)
    if dtype == np.dtype(np.float16):
        return numpy_helper.from_array(np.ascontiguousarray(values), name)
    raw = np.ascontiguousarray(values).tobytes()
    return helper.make_tensor(name, code, values.shape, raw, raw=True)
