"""Clustered weights (Palettized) in ONNX: a codebook and bit-packed indices.

The indices are packed LSB-first into a uint8 initializer (two per byte at
4 bits) and unpacked by BitShift / BitwiseAnd / Reshape / Slice / Cast,
then looked up with Gather (one codebook) or GatherElements (one per
channel). Every input of that chain is an initializer, so onnxruntime
constant-folds the whole chain when it loads the model: the weight costs
nothing at run time. (DequantizeLinear is never folded; it is not used here.)
Widths that do not divide 8 (3, 5, 6, 7 bits) are unpacked bit by bit and
summed with ReduceSum. BitwiseAnd needs opset 18.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from modelpress.core.encoded import Palettized
from modelpress.core.packing import pack_bits, unpack_bits

from modelpress.formats.onnx.emitted import Emitted, FreshName

PALETTE_OPSET = 18


class _Chain:
    """Collects the initializers and nodes of one decode chain under fresh names."""

    def __init__(self, name: str, fresh: FreshName) -> None:
        self.name, self.fresh = name, fresh
        self.initializers: list[onnx.TensorProto] = []
        self.roles: dict[str, str] = {}
        self.nodes: list[onnx.NodeProto] = []

    def const(self, role: str, array: np.ndarray) -> str:
        key = self.fresh(f"{self.name}_{role}")
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), key))
        self.roles[role] = key
        return key

    def node(self, op: str, inputs: list[str], output: str | None = None, **attrs: Any) -> str:
        out = output or self.fresh(f"{self.name}_{op.lower()}")
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.fresh(f"{self.name}_{op}"),
                                           **attrs))
        return out


def emit_palettized(name: str, pal: Palettized, fresh: FreshName) -> Emitted:
    """Initializers and nodes producing `name` from a codebook and packed indices."""
    chain = _Chain(name, fresh)
    bits, count = pal.bits, pal.size
    # Indices are stored one codebook row after another (channel axis first).
    rows = pal.rows(pal.indices)
    packed = chain.const("indices", pack_bits(rows, bits))
    flat = _unpack(chain, packed, bits, count)
    if pal.channel_axis is None:
        lut = chain.const("lut", pal.lut.reshape(-1))
        index = chain.node("Reshape", [flat, chain.const("shape", np.array(pal.shape, np.int64))])
        chain.node("Gather", [lut, index], name)
    else:
        lut = chain.const("lut", pal.lut)
        index = chain.node("Reshape", [flat, chain.const("rows", np.array(rows.shape, np.int64))])
        picked = chain.node("GatherElements", [lut, index], axis=1)
        moved = (pal.shape[pal.channel_axis],) + tuple(
            d for i, d in enumerate(pal.shape) if i != pal.channel_axis)
        last = None if pal.channel_axis == 0 else chain.fresh(f"{name}_moved")
        chain.node("Reshape", [picked, chain.const("shape", np.array(moved, np.int64))],
                   last or name)
        if last is not None:
            chain.node("Transpose", [last], name, perm=_restore_perm(len(pal.shape),
                                                                     pal.channel_axis))
    spec = {"layout": "palettized", "bits": bits, "clusters": pal.clusters, "count": count,
            "channel_axis": pal.channel_axis, "zero_index": pal.zero_index,
            "initializers": chain.roles, "nodes": [n.name for n in chain.nodes]}
    return Emitted(initializers=chain.initializers, nodes=chain.nodes, spec=spec,
                   opset=PALETTE_OPSET)


def _unpack(chain: _Chain, packed: str, bits: int, count: int) -> str:
    """Nodes turning the packed bytes into `count` int64 indices (1-D)."""
    n_bytes = math.ceil(count * bits / 8)
    column = chain.node("Reshape", [packed, chain.const("column", np.array([n_bytes, 1], np.int64))])
    if bits == 8:
        values, total = column, n_bytes
    elif 8 % bits == 0:
        per = 8 // bits
        shifts = chain.const("shifts", (np.arange(per, dtype=np.uint8) * bits)[None, :])
        shifted = chain.node("BitShift", [column, shifts], direction="RIGHT")
        values = chain.node("BitwiseAnd", [shifted, chain.const("mask", np.array(
            (1 << bits) - 1, np.uint8))])
        total = n_bytes * per
    else:
        shifts = chain.const("shifts", np.arange(8, dtype=np.uint8)[None, :])
        shifted = chain.node("BitShift", [column, shifts], direction="RIGHT")
        stream = chain.node("BitwiseAnd", [shifted, chain.const("mask", np.array(1, np.uint8))])
        total = n_bytes * 8
        values = stream
    flat = chain.node("Reshape", [values, chain.const("flat", np.array([-1], np.int64))])
    need = count if 8 % bits == 0 else count * bits
    if total != need:
        flat = chain.node("Slice", [flat, chain.const("start", np.array([0], np.int64)),
                                    chain.const("end", np.array([need], np.int64))])
    index = chain.node("Cast", [flat], to=onnx.TensorProto.INT64)
    if 8 % bits == 0:
        return index
    # One row of `bits` bits per index, least significant first: weight and sum them.
    per_index = chain.node("Reshape", [index, chain.const("bit_rows", np.array([count, bits],
                                                                                np.int64))])
    weighted = chain.node("Mul", [per_index, chain.const(
        "bit_weights", (1 << np.arange(bits, dtype=np.int64))[None, :])])
    return chain.node("ReduceSum", [weighted, chain.const("axes", np.array([1], np.int64))],
                      keepdims=0)


def _restore_perm(rank: int, channel_axis: int) -> list[int]:
    """Transpose perm that undoes moving `channel_axis` to the front."""
    return [0 if i == channel_axis else (i + 1 if i < channel_axis else i) for i in range(rank)]


def decode_palettized(spec: dict[str, Any], initializers: dict[str, onnx.TensorProto],
                      shape: tuple[int, ...]) -> Palettized:
    """Rebuild a Palettized node from the initializers `emit_palettized` wrote."""
    t = spec["initializers"]
    lut = numpy_helper.to_array(initializers[t["lut"]])
    lut = lut.reshape(1, -1) if spec["channel_axis"] is None else lut
    packed = numpy_helper.to_array(initializers[t["indices"]])
    shell = Palettized(lut, np.zeros(shape, np.uint8), spec["channel_axis"], spec["zero_index"])
    rows = unpack_bits(packed, spec["bits"], spec["count"]).reshape(lut.shape[0], -1)
    return shell.with_indices(np.require(shell.unrows(rows), requirements="C"))  # keeps 0-d
