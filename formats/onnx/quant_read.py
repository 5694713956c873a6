"""Quantized weights read back from ONNX: the Quantized node of each of the three forms
(see `quant`), and the consumer a kernel form replaced, put back for decompress."""

from __future__ import annotations

import base64
from dataclasses import replace
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from modelpress.core.encoded import Quantized, merged_shape
from modelpress.core.encoded import scale_shape as quantized_scale_shape
from modelpress.core.packing import to_signed, unpack_bits
from modelpress.core.scalecode import MultiplierCode, ScaleCode, base_shape

from modelpress.formats.onnx.graph import graphs


def transpose(q: Quantized) -> Quantized:
    """A 2-D Quantized node of the transposed matrix."""
    flip = {0: 1, 1: 0, None: None}
    code = None if q.scale_code is None else q.scale_code.transposed()
    return replace(q, codes=np.ascontiguousarray(q.codes.T), scale=np.ascontiguousarray(q.scale.T),
                   zero_point=None if q.zero_point is None else np.ascontiguousarray(
                       q.zero_point.T),
                   channel_axis=flip[q.channel_axis], block_axis=flip[q.block_axis],
                   scale_code=code)


def decode_quantized(spec: dict[str, Any], initializers: dict[str, onnx.TensorProto],
                     shape: tuple[int, ...]) -> Quantized:
    """Rebuild the Quantized node written by one of the three forms."""
    if "symmetric" not in spec:
        return _decode_legacy(spec, initializers, shape)
    t, bits = spec["initializers"], spec["bits"]
    stored = tuple(reversed(shape)) if spec.get("transposed") else tuple(shape)
    span = spec.get("block_span") or 1
    if span > 1:  # read as written: on the shape with the span's axes flattened
        stored = merged_shape(stored, spec["block_axis"], span)
    scale_shape = quantized_scale_shape(stored, spec["granularity"], spec["channel_axis"],
                                        spec["block_axis"], spec["group_size"])
    count = int(np.prod(stored, dtype=np.int64))
    # Codes widened for the 8-bit kernel are stored as UINT4 at 4 bits (read as the
    # 4-bit kernel form's, in the same order), else as a packed stream.
    layout = "quantized" if spec.get("widened") and bits != 4 else spec["layout"]
    codes = _read_codes(layout, initializers[t["codes"]], bits, stored, count,
                        spec.get("group_size"))
    code = None
    if spec.get("super_block"):
        code = _read_multipliers(spec, initializers, scale_shape)
        scale = code.decode()
    elif spec.get("scale_bits"):
        sb = spec["scale_bits"]
        n = int(np.prod(scale_shape, dtype=np.int64))
        raw = unpack_bits(numpy_helper.to_array(initializers[t["scale_codes"]]), sb, n)
        code = ScaleCode(raw.reshape(scale_shape), numpy_helper.to_array(
            initializers[t["scale_high"]]), numpy_helper.to_array(initializers[t["scale_low"]]), sb)
        scale = code.decode()
    else:
        scale = numpy_helper.to_array(initializers[t["scale"]]).reshape(scale_shape)
    zero = None
    if not spec["symmetric"]:
        width = spec["zero_bits"]
        n = int(np.prod(scale_shape, dtype=np.int64))
        raw = unpack_bits(numpy_helper.to_array(initializers[t["zero_codes"]]), width, n)
        zero = to_signed(raw, width).reshape(scale_shape)
    q = Quantized(codes=codes, scale=scale, zero_point=zero, bits=bits,
                  granularity=spec["granularity"], channel_axis=spec["channel_axis"],
                  block_axis=spec["block_axis"], group_size=spec["group_size"],
                  scale_code=code, zero_bits=None if zero is None else spec["zero_bits"])
    if span > 1:
        return q.spread(tuple(shape), span)
    return transpose(q) if spec.get("transposed") else q


def _read_multipliers(spec: dict[str, Any], initializers: dict[str, onnx.TensorProto],
                      scale_shape: tuple[int, ...]) -> MultiplierCode:
    t, axis = spec["initializers"], spec["block_axis"]
    ratio = spec["super_block"] // spec["group_size"]
    n = int(np.prod(scale_shape, dtype=np.int64))
    raw = unpack_bits(numpy_helper.to_array(initializers[t["scale_multipliers"]]), 4, n)
    base = numpy_helper.to_array(initializers[t["scale_base"]])
    return MultiplierCode(raw.reshape(scale_shape),
                          base.reshape(base_shape(scale_shape, axis, ratio)), axis, ratio)


def _read_codes(layout: str, tensor: onnx.TensorProto, bits: int, shape: tuple[int, ...],
                count: int, group: int | None) -> np.ndarray:
    if layout == "quantized":
        if bits == 8:
            return numpy_helper.to_array(tensor).astype(np.int8).reshape(shape)
        raw = unpack_bits(numpy_helper.to_array(tensor), bits, count)
        return to_signed(raw, bits).reshape(shape)
    if layout == "dequantize-linear":
        if bits == 8:
            values = numpy_helper.to_array(tensor)
            if tensor.data_type == onnx.TensorProto.INT8:
                return values.astype(np.int8).reshape(shape)
            return to_signed(values, 8).reshape(shape)
        if bits != 4:  # 5-7 bits: a packed stream unpacked by the chain
            return _read_codes("quantized", tensor, bits, shape, count, group)
        raw = unpack_bits(np.frombuffer(tensor.raw_data, np.uint8), 4, count)
        if tensor.data_type == onnx.TensorProto.INT4:
            return to_signed(raw ^ 0x08, 4).reshape(shape)
        return to_signed(raw, 4).reshape(shape)
    if layout == "matmul-nbits":
        packed = numpy_helper.to_array(tensor).reshape(shape[0], -1)
        if bits == 8:
            return to_signed(packed[:, :shape[1]], 8)
        nibbles = np.empty((shape[0], packed.shape[1] * 2), np.uint8)
        nibbles[:, 0::2], nibbles[:, 1::2] = packed & 0x0F, packed >> 4
        return to_signed(nibbles[:, :shape[1]], 4)
    raise ValueError(f"unknown quantized layout {layout!r}")


def _decode_legacy(spec: dict[str, Any], initializers: dict[str, onnx.TensorProto],
                   shape: tuple[int, ...]) -> Quantized:
    """A `dequantize-linear` spec of modelpress <= 0.1: INT8/INT4 codes, plain scales."""
    t = spec["initializers"]
    scale_shape = quantized_scale_shape(tuple(shape), spec["granularity"], spec["channel_axis"],
                                        spec["block_axis"], spec["group_size"])
    zero = None
    if "zero_point" in t:
        zero = numpy_helper.to_array(initializers[t["zero_point"]]).astype(np.int8).reshape(
            scale_shape)
    return Quantized(
        codes=numpy_helper.to_array(initializers[t["codes"]]).astype(np.int8).reshape(shape),
        scale=numpy_helper.to_array(initializers[t["scale"]]).reshape(scale_shape),
        zero_point=zero, bits=spec["bits"], granularity=spec["granularity"],
        channel_axis=spec["channel_axis"], block_axis=spec["block_axis"],
        group_size=spec["group_size"])


def restore_consumer(model: onnx.ModelProto, spec: dict[str, Any]) -> None:
    """Put back the node a kernel form replaced (before its replacement is removed)."""
    if "consumer" not in spec:
        return
    original = onnx.NodeProto()
    original.ParseFromString(base64.b64decode(spec["consumer"]))
    for graph in graphs(model.graph):
        names = [n.name for n in graph.node]
        if spec["replacement"] in names:
            graph.node.insert(names.index(spec["replacement"]), original)
            return
    raise ValueError(f"node {spec['replacement']!r} that replaced a weight's consumer is missing")
