"""Decode chains: nodes that rebuild a tensor from packed initializers, as model-local functions.

Every input of a chain is an initializer, so onnxruntime constant-folds it
when it loads the model (it folds any node whose inputs are all constant,
except DequantizeLinear): a weight decoded this way costs nothing at run
time and runs at the speed of the original.

A chain is written as a model-local ONNX function (domain "modelpress")
called once per tensor: the tensor's data (codes, scale codes, tables) are
initializers passed as inputs, its shapes are attributes of the call
(`Constant(value_ints=@attr)` in the body), and constants that depend only on
the encoding (shifts, masks) live in the body. Tensors encoded alike share
one function, so the graph gains one node per weight. onnxruntime inlines
the function, then folds it.

Bit-packed codes are unpacked group by group: `lcm(bits, 8) / bits` codes
share `lcm(bits, 8) / 8` bytes, and code j of a group is its bytes shifted
and masked (`BitShift`, `BitwiseAnd`, `BitwiseOr` on uint8, opset 18), so the
intermediates while folding stay at one byte per code.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from modelpress.core.packing import pack_bits

from modelpress.formats.onnx.graph import graphs

CHAIN_OPSET = 18  # BitwiseAnd / BitwiseOr
DOMAIN = "modelpress"


class Chain:
    """One tensor's decode chain: graph initializers, a function body, and its call."""

    def __init__(self, name: str, fresh: Any, kind: str) -> None:
        self.name, self.fresh, self.kind = name, fresh, kind
        self.initializers: list[onnx.TensorProto] = []
        self.roles: dict[str, str] = {}           # role -> initializer name (for the spec)
        self.inputs: list[str] = []               # function inputs (roles), in call order
        self.body: list[onnx.NodeProto] = []
        self.attributes: list[onnx.AttributeProto] = []
        self._ints: dict[tuple[int, ...], str] = {}  # values -> the Constant holding them
        self._count = 0

    # -- what the chain reads ------------------------------------------------

    def data(self, role: str, tensor: onnx.TensorProto) -> str:
        """A per-tensor initializer passed into the function; returns its local name."""
        self.outer(role, tensor)
        self.inputs.append(role)
        return role

    def array(self, role: str, array: np.ndarray) -> str:
        """`data` for a numpy array, stored under a fresh name `<tensor>_<role>`."""
        tensor = numpy_helper.from_array(np.ascontiguousarray(array), self.fresh(
            f"{self.name}_{role}"))
        return self.data(role, tensor)

    def outer(self, role: str, tensor: onnx.TensorProto) -> str:
        """A per-tensor initializer used outside the function (e.g. by DequantizeLinear)."""
        self.initializers.append(tensor)
        self.roles[role] = tensor.name
        return tensor.name

    def ints(self, attr: str, values: Any) -> str:
        """A per-tensor int64 vector, held as an attribute of the call.

        Equal vectors share one attribute (the scale and zero-point grids of
        a tensor have the same shapes): every call carries fewer bytes.
        """
        values = [int(v) for v in np.asarray(values).reshape(-1)]
        if tuple(values) in self._ints:
            return self._ints[tuple(values)]
        attribute = onnx.AttributeProto(name=attr, type=onnx.AttributeProto.INTS, ints=values)
        self.attributes.append(attribute)
        ref = onnx.AttributeProto(name="value_ints", type=onnx.AttributeProto.INTS,
                                  ref_attr_name=attr)
        out = self._local()
        node = helper.make_node("Constant", [], [out])
        node.attribute.append(ref)
        self.body.append(node)
        self._ints[tuple(values)] = out
        return out

    def const(self, array: np.ndarray) -> str:
        """A constant of the encoding kind (the same for every tensor of the kind)."""
        out = self._local()
        self.body.append(helper.make_node("Constant", [], [out],
                                          value=numpy_helper.from_array(np.asarray(array))))
        return out

    # -- what it does --------------------------------------------------------

    def node(self, op: str, inputs: list[str], **attrs: Any) -> str:
        out = self._local()
        self.body.append(helper.make_node(op, inputs, [out], **attrs))
        return out

    def call(self, outputs: dict[str, str], opset: int) -> tuple[onnx.NodeProto,
                                                                 onnx.FunctionProto]:
        """The call node (local output -> graph name) and the function it calls."""
        function = helper.make_function(
            DOMAIN, self.kind, self.inputs, list(outputs), self.body,
            opset_imports=[helper.make_opsetid("", opset)],
            attributes=[a.name for a in self.attributes])
        node = helper.make_node(self.kind, [self.roles[r] for r in self.inputs],
                                list(outputs.values()), name=self.fresh(f"{self.name}_decode"),
                                domain=DOMAIN)
        node.attribute.extend(self.attributes)
        return node, function

    def _local(self) -> str:
        self._count += 1
        return f"v{self._count}"


def packed_stream(values: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned values packed LSB-first, padded to whole groups of `lcm(bits, 8)` bits."""
    group_bytes = math.lcm(bits, 8) // 8
    packed = pack_bits(np.asarray(values, np.uint8).reshape(-1), bits)
    pad = -packed.size % group_bytes
    return np.concatenate([packed, np.zeros(pad, np.uint8)]) if pad else packed


def unpack(chain: Chain, packed: str, bits: int, count_attr: str, count: int) -> str:
    """Nodes turning a `packed_stream` into `count` uint8 values (1-D)."""
    if bits == 8:  # the stream is the values, unpadded
        return packed
    per_group = math.lcm(bits, 8) // bits
    group_bytes = per_group * bits // 8
    groups = chain.node("Reshape", [packed, chain.const(np.array([-1, group_bytes], np.int64))])
    starts = np.arange(per_group) * bits
    first, offset = starts // 8, starts % 8
    spill = offset + bits > 8
    low = chain.node("BitShift", [chain.node("Gather", [groups, chain.const(first)], axis=1),
                                  chain.const(offset.astype(np.uint8))], direction="RIGHT")
    if spill.any():
        second = np.where(spill, first + 1, first)
        high = chain.node("BitShift", [chain.node("Gather", [groups, chain.const(second)], axis=1),
                                       chain.const((8 - offset).astype(np.uint8))],
                          direction="LEFT")
        high = chain.node("BitwiseAnd", [high, chain.const(np.where(spill, 0xFF, 0).astype(
            np.uint8))])
        low = chain.node("BitwiseOr", [low, high])
    values = chain.node("BitwiseAnd", [low, chain.const(np.array((1 << bits) - 1, np.uint8))])
    flat = chain.node("Reshape", [values, chain.const(np.array([-1], np.int64))])
    if count % per_group == 0:  # no padding codes to cut
        return flat
    return chain.node("Slice", [flat, chain.const(np.array([0], np.int64)),
                                chain.ints(count_attr, [count])])


def expand_groups(chain: Chain, values: str, shape: tuple[int, ...], axis: int, group: int,
                  length: int, attr: str) -> str:
    """Repeat each of `values` (`shape`, groups along `axis`) `group` times, cut to `length`.

    `attr` prefixes the call attributes holding the shapes involved.
    """
    before, after = list(shape[:axis + 1]), list(shape[axis + 1:])
    x = chain.node("Reshape", [values, chain.ints(f"{attr}_split", before + [1] + after)])
    x = chain.node("Expand", [x, chain.ints(f"{attr}_expand", before + [group] + after)])
    merged = list(shape[:axis]) + [shape[axis] * group] + after
    x = chain.node("Reshape", [x, chain.ints(f"{attr}_merged", merged)])
    if shape[axis] * group == length:  # whole groups: nothing to cut
        return x
    return chain.node("Slice", [x, chain.const(np.array([0], np.int64)),
                                chain.ints(f"{attr}_length", [length]),
                                chain.ints(f"{attr}_axis", [axis])])


def coded_scales(chain: Chain, codes: np.ndarray, high: np.ndarray, low: np.ndarray,
                 bits: int, shape: tuple[int, ...]) -> str:
    """float32 scales `high[c >> bits//2] * low[c & mask]` of `shape`, from packed codes.

    The 2^bits products are formed once as a table `high ⊗ low` (row `c >> bits//2`,
    column `c & mask`: entry `c`) and each scale is one Gather from it with int32
    indices: onnxruntime keeps every folded intermediate of every weight until
    its folding pass ends, and two int64 index tensors and two gathered float
    tensors per scale cost 3x the bytes (measured at load of a 36-layer model).
    Each entry is the same float32 product, so the scales are unchanged.
    """
    packed = chain.array("scale_codes", packed_stream(codes, bits))
    flat = unpack(chain, packed, bits, "scale_count", int(codes.size))
    column = chain.node("Reshape", [chain.array("scale_high", high.astype(np.float32)),
                                    chain.const(np.array([-1, 1], np.int64))])
    row = chain.node("Reshape", [chain.array("scale_low", low.astype(np.float32)),
                                 chain.const(np.array([1, -1], np.int64))])
    table = chain.node("Reshape", [chain.node("Mul", [column, row]),
                                   chain.const(np.array([-1], np.int64))])
    index = chain.node("Cast", [flat], to=onnx.TensorProto.INT32)
    return chain.node("Reshape", [chain.node("Gather", [table, index]),
                                  chain.ints("scale_layout", list(shape))])


def multiplier_scales(chain: Chain, multipliers: np.ndarray, base: np.ndarray, axis: int,
                      ratio: int, shape: tuple[int, ...]) -> str:
    """float32 scales `base * multiplier` of `shape` (groups along `axis`, `ratio` per base).

    The product of a float16 base and an integer below 16 is exact in float32. Where
    the bases tile the groups, the multipliers are viewed as [.., bases, ratio, ..] and
    multiplied by the bases broadcast over them: no expanded copy of the bases, which
    onnxruntime would hold until its load-time folding ends.
    """
    bases = float_bases(chain, base)
    blocks = base.shape[axis]
    if blocks * ratio != shape[axis]:  # a ragged last super-block: expand the bases
        multiplier = multiplier_values(chain, multipliers, onnx.TensorProto.FLOAT, shape)
        spread = expand_groups(chain, bases, tuple(base.shape), axis, ratio, shape[axis],
                               "base")
        return chain.node("Mul", [spread, multiplier])
    head, tail = list(shape[:axis]), list(shape[axis + 1:])
    multiplier = multiplier_values(chain, multipliers, onnx.TensorProto.FLOAT,
                                   tuple(head + [blocks, ratio] + tail), "multiplier_split")
    bases = chain.node("Reshape", [bases, chain.ints("base_split", head + [blocks, 1] + tail)])
    return chain.node("Reshape", [chain.node("Mul", [multiplier, bases]),
                                  chain.ints("scale_layout", list(shape))])


def float_bases(chain: Chain, base: np.ndarray) -> str:
    """The float16 bases of multiplier scales, stored as such, as float32."""
    return chain.node("Cast", [chain.array("scale_base", base.astype(np.float16))],
                      to=onnx.TensorProto.FLOAT)


def multiplier_values(chain: Chain, multipliers: np.ndarray, to: int,
                      shape: tuple[int, ...], attr: str = "scale_layout") -> str:
    """The 4-bit multipliers (stored as a packed stream) of `shape`, as type `to`
    (`attr` names the call attribute holding the shape)."""
    packed = chain.array("scale_multipliers", packed_stream(multipliers.reshape(-1), 4))
    values = unpack(chain, packed, 4, "scale_count", int(multipliers.size))
    if to != onnx.TensorProto.UINT8:
        values = chain.node("Cast", [values], to=to)
    return chain.node("Reshape", [values, chain.ints(attr, list(shape))])


def add_function(model: onnx.ModelProto, function: onnx.FunctionProto,
                 call: onnx.NodeProto) -> None:
    """Add `function` to the model, sharing an identical one; `call` follows a rename."""
    base = function.name
    same_name = [f for f in model.functions if f.domain == DOMAIN and (
        f.name == base or re.fullmatch(re.escape(base) + r"_\d+", f.name))]
    for existing in same_name:
        probe = onnx.FunctionProto()
        probe.CopyFrom(function)
        probe.name = existing.name
        if probe.SerializeToString() == existing.SerializeToString():
            call.op_type = existing.name
            return
    if same_name:
        function.name = f"{function.name}_{len(same_name) + 1}"
        call.op_type = function.name
    model.functions.append(function)
    if not any(o.domain == DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, 1))


def drop_unused_functions(model: onnx.ModelProto) -> None:
    """Remove modelpress functions no node calls any more (and their opset import)."""
    called = {(n.domain, n.op_type) for g in graphs(model.graph) for n in g.node}
    keep = [f for f in model.functions if f.domain != DOMAIN or (f.domain, f.name) in called]
    del model.functions[:]
    model.functions.extend(keep)
    if not any(f.domain == DOMAIN for f in keep):
        imports = [o for o in model.opset_import if o.domain != DOMAIN]
        del model.opset_import[:]
        model.opset_import.extend(imports)
