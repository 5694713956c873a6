"""Integer-quantized weights (Quantized) in ONNX, in the form onnxruntime runs fastest.

Three forms, chosen per tensor (see `onnx_sites` for when):

- "quantized" (folded chain, any weight): codes bit-packed LSB-first in a
  uint8 initializer (int8 as is at 8 bits) -> unpack -> Cast(float) ->
  Sub(zero point) -> Mul(scale) -> W. Scales are floats or codes on a
  log grid (`coded_scales`); zero points a packed stream. onnxruntime folds
  it at load: float32 speed and exactly `Quantized.decode()`, small file.
- "dequantize-linear" (4-bit MatMul/Gemm weights that take onnxruntime's
  4-bit kernel): INT4 codes (UINT4 with a UINT4 zero point when asymmetric)
  `[K, N]` -> DequantizeLinear(axis 0, block_size) -> MatMul. Scales and zero
  points come from folded chains; onnxruntime fuses the rest into
  MatMulNBits. Codes of 5-7 bits, and codes with multiplier scales
  (`128 + m * (code - zero)` per super-block), are widened to UINT8 by the
  chain and take the 8-bit kernel. A Gemm with transB=1 is rewritten to transB=0 on the
  transposed weight (the original node is kept in the spec for decompress).
- "matmul-nbits" (`--onnx-target ort`): the MatMul/Gemm is replaced by
  com.microsoft.MatMulNBits (B uint8 `[N, k_blocks, block/2]`, scales
  `[N, k_blocks]`, zero points packed two per byte per row) with the chosen
  accuracy_level.

Every spec holds what `decode_quantized` needs to rebuild the Quantized node.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from modelpress.core.encoded import Encoded, Quantized
from modelpress.core.packing import pack_bits, to_unsigned
from modelpress.core.scalecode import MultiplierCode

from modelpress.formats.onnx.chain import (CHAIN_OPSET, Chain, coded_scales, expand_groups, float_bases, multiplier_scales, multiplier_values, packed_stream, unpack)
from modelpress.formats.onnx.emitted import Emitted, FreshName
from modelpress.formats.onnx.quant_read import transpose
from modelpress.formats.onnx.sites import KernelSite, OnnxTarget, quantized_part

FORMS = ("quantized", "dequantize-linear", "matmul-nbits")
MS_DOMAIN = "com.microsoft"


def form_opset(form: str, q: Quantized) -> int:
    """Lowest default-domain opset a form needs."""
    if form == "dequantize-linear":
        return 21
    if form == "quantized" and q.bits == 8 and q.scale_code is None:
        return 13
    return CHAIN_OPSET


def kind_name(q: Quantized, what: str) -> str:
    """The decode function's name: what it decodes, e.g. Int4AsymZ2S5Group."""
    name = f"Int{q.bits}{'Sym' if q.symmetric else 'Asym'}"
    if not q.symmetric:
        name += f"Z{q.stored_zero_bits}"
    if q.super_block:
        name += f"M{q.super_block}"
    elif q.scale_code is not None:
        name += f"S{q.scale_code.bits}"
    return name + what


def emit_folded(name: str, encoded: Encoded, fresh: FreshName, dtype: np.dtype,
                opset: int) -> Emitted:
    """The folded chain producing `name` (of `dtype`) from a Quantized tensor (one with a
    block span is decoded on its merged shape, then reshaped)."""
    spanned = quantized_part(encoded)
    q = spanned.merged()
    chain = Chain(name, fresh, kind_name(q, q.granularity.capitalize()))
    offset = 0 if q.bits == 8 else 1 << (q.bits - 1)
    if q.bits == 8:
        codes = chain.data("codes", numpy_helper.from_array(q.codes.astype(np.int8),
                                                            fresh(f"{name}_quantized")))
    else:
        packed = chain.data("codes", numpy_helper.from_array(
            packed_stream(to_unsigned(q.codes, q.bits), q.bits), fresh(f"{name}_quantized")))
        codes = chain.node("Reshape", [unpack(chain, packed, q.bits, "count", q.size),
                                       chain.ints("shape", list(q.shape))])
    x = chain.node("Cast", [codes], to=onnx.TensorProto.FLOAT)
    if q.zero_point is not None:
        zero = _zero_values(chain, q, offset, onnx.TensorProto.FLOAT)
        x = chain.node("Sub", [x, _expanded(chain, q, zero, "zero")])
    elif offset:
        x = chain.node("Sub", [x, chain.const(np.array(offset, np.float32))])
    scale = _scales(chain, q, q.scale.shape)
    w = chain.node("Mul", [x, _expanded(chain, q, scale, "scale", shaped=True)])
    if spanned.block_span > 1:
        w = chain.node("Reshape", [w, chain.ints("dense_shape", list(spanned.shape))])
    if np.dtype(dtype) != np.dtype(np.float32):
        w = chain.node("Cast", [w], to=helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))
    call, function = chain.call({w: name}, opset)
    spec = _spec("quantized", spanned, chain, [call.name], transposed=False)
    return Emitted(initializers=chain.initializers, nodes=[call], spec=spec,
                   opset=form_opset("quantized", q), functions=[function])


def emit_kernel(name: str, encoded: Encoded, fresh: FreshName, site: KernelSite,
                target: OnnxTarget, model: onnx.ModelProto, opset: int) -> Emitted:
    """A MatMul/Gemm weight in the kernel form of `target` (rewrites the consumer)."""
    q = quantized_part(encoded)
    if site.form == "matmul-nbits":
        return _matmul_nbits(name, q, fresh, site, target, model, opset)
    return _dequantize_linear(name, q, fresh, site, opset)


def _side_call(chain: Chain, outputs: dict[str, str], opset: int,
               extra: list[onnx.NodeProto]) -> tuple[list[onnx.NodeProto], list[Any]]:
    """The side-information call (when the chain computes anything) before `extra` nodes."""
    if not chain.body:
        return extra, []
    call, function = chain.call(outputs, opset)
    return [call] + extra, [function]


def _dequantize_linear(name: str, q: Quantized, fresh: FreshName, site: KernelSite,
                       opset: int) -> Emitted:
    kn = q if site.stored_kn else transpose(q)
    chain = Chain(name, fresh, kind_name(kn, "Blocks"))
    outputs: dict[str, str] = {}
    codes_name, unsigned = _dq_codes(chain, kn, site.bits, fresh, outputs)
    blocks = -(-site.k // site.block)
    scale = _block_scales(chain, kn, site, 0, outputs)
    inputs = [codes_name, scale]
    if unsigned:
        offset = 1 << (site.bits - 1)
        if kn.symmetric or _widened(kn, site.bits):
            # 5-7-bit codes unpacked to bytes + 128, or multiplied codes + 128: zero point 128
            zero = chain.node("Expand", [chain.const(np.array(offset, np.uint8)),
                                         chain.ints("zero_blocks", [blocks, site.n])])
        else:
            zero = _block_values(chain, kn, _zero_values(chain, kn, offset,
                                                         onnx.TensorProto.UINT8), site, 0,
                                 "zero")
        if site.bits == 4:
            zero = chain.node("Cast", [zero], to=onnx.TensorProto.UINT4)
        inputs.append(fresh(f"{name}_zero_point"))
        outputs[zero] = inputs[-1]
    output = name if site.stored_kn else fresh(f"{name}_transposed")
    dq = helper.make_node("DequantizeLinear", inputs, [output],
                          name=fresh(f"{name}_DequantizeLinear"), axis=0,
                          block_size=site.block)
    nodes, functions = _side_call(chain, outputs, opset, [dq])
    spec = _spec("dequantize-linear", kn, chain, [n.name for n in nodes],
                 transposed=not site.stored_kn)
    if _widened(kn, site.bits):
        spec["widened"] = True
    if not site.stored_kn:  # Gemm(A, W[N, K], transB=1) -> Gemm(A, W^T[K, N], transB=0)
        gemm = onnx.NodeProto()
        gemm.CopyFrom(site.node)
        gemm.input[1] = output
        for attr in gemm.attribute:
            if attr.name == "transB":
                attr.i = 0
        gemm.name = fresh(f"{name}_Gemm")
        _swap_consumer(site, gemm, spec)
    return Emitted(initializers=chain.initializers, nodes=nodes, spec=spec,
                   opset=form_opset("dequantize-linear", q), functions=functions)


def _dq_codes(chain: Chain, kn: Quantized, kernel: int, fresh: FreshName,
              outputs: dict[str, str]) -> tuple[str, bool]:
    """DequantizeLinear's codes `[K, N]`, and whether they are unsigned (offset by 2^(b-1)).

    4 and 8 bits are stored as the kernel reads them (INT4/UINT4, INT8/UINT8);
    5-7 bits stay packed in the file and a folded chain unpacks them to UINT8.
    """
    name = chain.name
    if _widened(kn, kernel):
        return _multiplied_codes(chain, kn, outputs), True
    if kn.bits == 4:
        codes = kn.codes if kn.symmetric else to_unsigned(kn.codes, 4)
        kind = onnx.TensorProto.INT4 if kn.symmetric else onnx.TensorProto.UINT4
        raw = pack_bits((codes & 0x0F).astype(np.uint8), 4).tobytes()
        return chain.outer("codes", helper.make_tensor(fresh(f"{name}_quantized"), kind,
                                                       list(kn.shape), raw, raw=True)), \
            not kn.symmetric
    if kn.bits == 8:
        codes = kn.codes.astype(np.int8) if kn.symmetric else to_unsigned(kn.codes, 8)
        return chain.outer("codes", numpy_helper.from_array(
            np.ascontiguousarray(codes), fresh(f"{name}_quantized"))), not kn.symmetric
    packed = chain.data("codes", numpy_helper.from_array(
        packed_stream(to_unsigned(kn.codes, kn.bits), kn.bits), fresh(f"{name}_quantized")))
    values = unpack(chain, packed, kn.bits, "count", kn.size)
    shift = (1 << (kernel - 1)) - (1 << (kn.bits - 1))
    values = chain.node("Add", [values, chain.const(np.array(shift, np.uint8))])
    values = chain.node("Reshape", [values, chain.ints("shape", list(kn.shape))])
    outputs[values] = fresh(f"{name}_codes")
    return outputs[values], True


def _widened(q: Quantized, kernel: int) -> bool:
    """Whether `q`'s codes are widened to `128 + m * (code - zero)` bytes (multiplier
    scales in the 8-bit kernel); in the 4-bit kernel they are stored as they are."""
    return bool(q.super_block) and kernel == 8


def _multiplied_codes(chain: Chain, kn: Quantized, outputs: dict[str, str]) -> str:
    """uint8 `128 + m * (code - zero)` `[K, N]`: each super-block's weights over its base
    (see `quantize_multiplier`), from the packed codes, zero points and multipliers.

    Computed as `(128 - m * z') + m * u` on bytes, with u = code + 2^(bits-1) and
    z' = zero + 2^(bits-1) (2^(bits-1) when symmetric): every intermediate lies in
    0..255 (m * z' <= 127 because code u = 0 must decode; the sum is the result), so
    nothing wraps, and onnxruntime's load-time folding, which keeps every
    intermediate until it ends, holds a few bytes per weight (measured on 8 x 4096^2
    weights: 618 MiB at load; with int32 arithmetic on bit-unpacked codes, 5.7 GiB).
    """
    code, uint8 = kn.scale_code, onnx.TensorProto.UINT8
    k, n = kn.shape
    groups = [k // kn.group_size, 1, n]
    grouped = [groups[0], kn.group_size, n]
    unsigned = to_unsigned(kn.codes, kn.bits)
    if kn.bits == 4:  # UINT4 as stored, one Cast: the fewest bytes while folding
        raw = pack_bits(unsigned, 4).tobytes()
        codes = chain.data("codes", helper.make_tensor(
            chain.fresh(f"{chain.name}_quantized"), onnx.TensorProto.UINT4, grouped, raw,
            raw=True))
        values = chain.node("Cast", [codes], to=uint8)
    else:
        packed = chain.data("codes", numpy_helper.from_array(
            packed_stream(unsigned, kn.bits), chain.fresh(f"{chain.name}_quantized")))
        values = chain.node("Reshape", [unpack(chain, packed, kn.bits, "count", kn.size),
                                        chain.ints("grouped", grouped)])
    multiplier = multiplier_values(chain, code.multipliers, uint8, tuple(groups))
    offset = 1 << (kn.bits - 1)  # unsigned codes and zero points are value + offset
    if kn.zero_point is not None:
        zero = chain.node("Reshape", [_zero_values(chain, kn, offset, uint8),
                                      chain.ints("scale_layout", groups)])
    else:
        zero = chain.const(np.array(offset, np.uint8))
    start = chain.node("Sub", [chain.const(np.array(128, np.uint8)),
                               chain.node("Mul", [multiplier, zero])])
    values = chain.node("Add", [chain.node("Mul", [values, multiplier]), start])
    values = chain.node("Reshape", [values, chain.ints("shape", [k, n])])
    outputs[values] = chain.fresh(f"{chain.name}_codes")
    return outputs[values]


def _block_scales(chain: Chain, q: Quantized, site: KernelSite, axis: int,
                  outputs: dict[str, str]) -> str:
    """The kernel's float32 scales, one per block along `axis` (K) of `q`'s layout."""
    name = chain.name
    if _widened(q, site.bits):  # the bases, one per super-block (split if wider than a block)
        code = q.scale_code
        base = float_bases(chain, code.base)
        ratio = q.super_block // site.block
        if ratio > 1:
            base = expand_groups(chain, base, tuple(code.base.shape), axis, ratio,
                                 -(-site.k // site.block), "block_scale")
        outputs[base] = chain.fresh(f"{name}_scale")
        return outputs[base]
    if q.scale_code is None and site.block == q.group_size:
        return chain.outer("scale", numpy_helper.from_array(
            np.ascontiguousarray(q.scale.astype(np.float32)), chain.fresh(f"{name}_scale")))
    scale = _block_values(chain, q, _scales(chain, q, q.scale.shape), site, axis, "scale",
                          shaped=True)
    outputs[scale] = chain.fresh(f"{name}_scale")
    return outputs[scale]


def _block_values(chain: Chain, q: Quantized, values: str, site: KernelSite, axis: int,
                  attr: str, *, shaped: bool = False) -> str:
    """Per-group values (flat, or scale-shaped) as one per kernel block along `axis`.

    A group larger than the kernel's largest block becomes several blocks
    sharing its value: the decoded weight is unchanged.
    """
    if not shaped:
        values = chain.node("Reshape", [values, chain.ints(f"{attr}_shape",
                                                           list(q.scale.shape))])
    ratio = q.group_size // site.block
    if ratio == 1:
        return values
    return expand_groups(chain, values, tuple(q.scale.shape), axis, ratio,
                         -(-site.k // site.block), f"block_{attr}")


def _matmul_nbits(name: str, q: Quantized, fresh: FreshName, site: KernelSite,
                  target: OnnxTarget, model: onnx.ModelProto, opset: int) -> Emitted:
    nk = transpose(q) if site.stored_kn else q
    chain = Chain(name, fresh, kind_name(nk, "NBits"))
    n, k, block, bits = site.n, site.k, site.block, site.bits
    blocks = -(-k // block)
    unsigned = np.zeros((n, blocks * block), np.uint8)
    unsigned[:, :k] = to_unsigned(nk.codes, bits)
    if bits == 4:
        packed = (unsigned[:, 0::2] | (unsigned[:, 1::2] << 4)).reshape(n, blocks, block // 2)
    else:
        packed = unsigned.reshape(n, blocks, block)
    codes = chain.outer("codes", numpy_helper.from_array(packed, fresh(f"{name}_quantized")))
    outputs: dict[str, str] = {}
    scale = _block_scales(chain, nk, site, 1, outputs)
    zero = ""
    if not nk.symmetric:
        zero = fresh(f"{name}_zero_point")
        values = _block_values(chain, nk, _zero_values(chain, nk, 1 << (bits - 1),
                                                       onnx.TensorProto.UINT8), site, 1, "zero")
        outputs[_packed_zero_points(chain, values, n, blocks) if bits == 4 else values] = zero
    inputs = [site.node.input[0], codes, scale]
    if site.bias:  # inputs: A, B, scales, zero_points, g_idx, bias
        inputs += [zero, "", site.bias]
    elif zero:
        inputs.append(zero)
    node = helper.make_node("MatMulNBits", inputs, list(site.node.output),
                            name=fresh(f"{name}_MatMulNBits"), domain=MS_DOMAIN, K=k, N=n,
                            bits=bits, block_size=block, accuracy_level=target.accuracy_level)
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    nodes, functions = _side_call(chain, outputs, opset, [])
    spec = _spec("matmul-nbits", nk, chain, [n.name for n in nodes], transposed=site.stored_kn)
    spec["accuracy_level"] = target.accuracy_level
    _swap_consumer(site, node, spec)
    return Emitted(initializers=chain.initializers, nodes=nodes, spec=spec,
                   opset=form_opset("matmul-nbits", q), functions=functions)


def _packed_zero_points(chain: Chain, zero: str, n: int, blocks: int) -> str:
    """uint8 [N, ceil(blocks / 2)]: each row's 4-bit zero points (`zero`, +8), two per byte."""
    if blocks % 2:
        zero = chain.node("Pad", [zero, chain.const(np.array([0, 0, 0, 1], np.int64))])
    pairs = chain.node("Reshape", [zero, chain.ints("zero_pairs", [n, -(-blocks // 2), 2])])
    low = chain.node("Gather", [pairs, chain.const(np.array(0, np.int64))], axis=2)
    high = chain.node("Gather", [pairs, chain.const(np.array(1, np.int64))], axis=2)
    high = chain.node("BitShift", [high, chain.const(np.array(4, np.uint8))], direction="LEFT")
    return chain.node("BitwiseOr", [low, high])


def _swap_consumer(site: KernelSite, node: onnx.NodeProto, spec: dict[str, Any]) -> None:
    """Put `node` where the consumer was; the spec keeps the original for decompress."""
    index = list(site.graph.node).index(site.node)
    original = site.node.SerializeToString()
    del site.graph.node[index]
    site.graph.node.insert(index, node)
    spec["consumer"] = base64.b64encode(original).decode("ascii")
    spec["replacement"] = node.name
    spec["nodes"].append(node.name)


# -- shared pieces -------------------------------------------------------------


def _zero_values(chain: Chain, q: Quantized, offset: int, to: int) -> str:
    """Zero points + `offset` as a flat tensor of type `to` (FLOAT or UINT8), from a packed stream."""
    width = q.stored_zero_bits
    stored = q.zero_point.astype(np.int16) + (1 << (width - 1))
    packed = chain.array("zero_codes", packed_stream(stored.astype(np.uint8), width))
    values = unpack(chain, packed, width, "zero_count", int(q.zero_point.size))
    shift = offset - (1 << (width - 1))
    if to == onnx.TensorProto.FLOAT:
        values = chain.node("Cast", [values], to=to)
        return chain.node("Add", [values, chain.const(np.array(shift, np.float32))]) \
            if shift else values
    return chain.node("Add", [values, chain.const(np.array(shift, np.uint8))]) \
        if shift else values


def _scales(chain: Chain, q: Quantized, shape: tuple[int, ...]) -> str:
    """float32 scales of `shape` (the scale array's elements in row-major order)."""
    code = q.scale_code
    if isinstance(code, MultiplierCode):
        return multiplier_scales(chain, code.multipliers, code.base, code.axis, code.ratio, shape)
    if code is not None:
        return coded_scales(chain, code.codes.reshape(-1), code.high, code.low, code.bits, shape)
    scale = chain.array("scale", np.ascontiguousarray(q.scale.reshape(shape)))
    if q.scale.dtype != np.float32:
        scale = chain.node("Cast", [scale], to=onnx.TensorProto.FLOAT)
    return scale


def _expanded(chain: Chain, q: Quantized, values: str, attr: str, *,
              shaped: bool = False) -> str:
    """Per-group values (flat, or scale-shaped if `shaped`) broadcastable against the weight."""
    if not shaped:
        values = chain.node("Reshape", [values, chain.ints(f"{attr}_shape",
                                                           list(q.scale.shape))])
    if q.granularity != "group":
        return values
    return expand_groups(chain, values, tuple(q.scale.shape), q.block_axis, q.group_size,
                         q.shape[q.block_axis], attr)


def _spec(layout: str, q: Quantized, chain: Chain, nodes: list[str], *,
          transposed: bool) -> dict[str, Any]:
    spec = {"layout": layout, "bits": q.bits, "granularity": q.granularity,
            "channel_axis": q.channel_axis, "block_axis": q.block_axis,
            "group_size": q.group_size, "symmetric": q.symmetric,
            "scale_bits": q.scale_bits, "zero_bits": q.stored_zero_bits or None,
            "super_block": q.super_block,
            "transposed": transposed, "initializers": dict(chain.roles), "nodes": list(nodes)}
    if q.block_span > 1:  # absent for span 1: files written before spans stay as they were
        spec["block_span"] = q.block_span
    return spec
