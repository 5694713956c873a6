"""Where a weight is used in an ONNX graph, and which tensors are sensitive to quantization.

onnxruntime runs 4-bit and 8-bit weights of a MatMul (or Gemm) in its own
kernel (MatMulNBits) only under conditions found by measurement (onnxruntime
1.32, CPU): the weight is 2-D with blocks along K of a power of two >= 16, the
graph's float type is float32, the dequantized weight has exactly one use,
and (for the standard `DequantizeLinear -> MatMul` form) that MatMul's only
consumer is not a Relu/Clip inside the graph: its QDQ selector then expects a
QuantizeLinear after the activation and leaves DequantizeLinear running at
every call (10x slower). The kernel is also slower than a float32 MatMul on
small matrices with more than one input row (measured with
benchmarks/onnx_speed.py: 16 rows, 1024x1024 took 1.15x, 2048x2048 0.8-1.0x),
so by default only weights of at least `KERNEL_MIN_WEIGHTS` elements use it;
the others are decoded by a chain that onnxruntime folds at load (float32
speed).

Weights of 5 to 8 bits, and 2-4-bit weights with multiplier scales (one
block per super-block), take the 8-bit kernel (codes held at one byte each
instead of four after load). With int8 activations (accuracy_level 4, the
fused form's default) it measured faster than a float32 MatMul from 1M
weights at 1-256 input rows (benchmarks/onnx_kernel8.py: 1024x1024 0.1-1.0x,
4096x4096 0.1-0.8x, 512x512 0.6-1.1x); with float activations
(accuracy_level 0) it is 8-26x slower, so it is not used then.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper

from modelpress.core.encoded import Encoded, Quantized, quantized_part

from modelpress.formats.onnx.graph import consumers, graphs, is_output
from modelpress.formats.onnx.options import OnnxTarget

KERNEL_MIN_WEIGHTS = 1 << 22
"""Default smallest K*N for which a 4-bit weight runs in onnxruntime's 4-bit kernel."""

KERNEL8_MIN_WEIGHTS = 1 << 20
"""Default smallest K*N for which a 5- to 8-bit weight runs in onnxruntime's 8-bit kernel."""

KERNEL8_MIN_BLOCK = 64
"""Default smallest block for the 8-bit kernel: at 128 input rows, blocks of 16-32 measured
0.94-1.19x a float32 MatMul, 64 and up 0.67-0.99x (per node, onnxruntime's profiler;
768x3072 to 4096x4096). A 6-bit backup head in groups of 16 is therefore folded."""

MAX_BLOCK = 256
"""Largest block onnxruntime's kernels take (MLAS: 16-256); larger groups are split."""

@dataclass
class KernelSite:
    """A weight's single use by a MatMul/Gemm that a 4-bit or 8-bit kernel can take."""

    graph: onnx.GraphProto
    node: onnx.NodeProto
    k: int
    n: int
    stored_kn: bool          # the weight is [K, N] (MatMul, Gemm transB=0); else [N, K]
    bias: str | None         # Gemm's C
    bits: int = 4            # the kernel's code width: 4, or 8 (for codes of 5-8 bits)
    group: int = 16          # the weight's quantization group along K
    form: str = "dequantize-linear"   # or "matmul-nbits" (see kernel_form)

    @property
    def block(self) -> int:
        """The kernel's block along K (a group larger than MAX_BLOCK is split)."""
        return min(self.group, MAX_BLOCK)


def kernel_bits(bits: int) -> int | None:
    """The width of the kernel that holds codes of `bits` bits exactly, or None."""
    if bits == 4:
        return 4
    return 8 if 5 <= bits <= 8 else None


def kernel_site(model: onnx.ModelProto, name: str, encoded: Encoded, dtype: np.dtype,
                target: OnnxTarget, home: onnx.GraphProto) -> KernelSite | None:
    """The MatMul/Gemm use of `name` that runs in a kernel, or None (fold instead)."""
    q = quantized_part(encoded)
    if q is None or np.dtype(dtype) != np.dtype(np.float32):
        return None
    # Codes with multiplier scales run in the 8-bit kernel, a block per super-block,
    # unless the model is too large to widen them at load.
    widened = bool(q.super_block) and target.widen
    bits = 8 if widened else kernel_bits(q.bits)
    mode = target.int4 if q.bits <= 4 else target.int8
    if bits is None or mode == "fold":
        return None
    if bits == 8 and target.target == "ort" and target.accuracy_level != 4:
        return None  # the 8-bit kernel with float activations is several times slower
    group = q.super_block if widened else q.group_size
    if (q.granularity != "group" or len(q.shape) != 2 or group < 16
            or group & (group - 1)):
        return None
    uses = consumers(model, name)
    if len(uses) != 1 or is_output(model, name) or uses[0][0] is not home:
        return None
    graph, node = uses[0]
    site = _matmul_site(node, name, q, model)
    if site is None:
        return None
    least = KERNEL_MIN_WEIGHTS if bits == 4 else KERNEL8_MIN_WEIGHTS
    if mode == "auto" and (site[0] * site[1] < least
                           or bits == 8 and min(group, MAX_BLOCK) < KERNEL8_MIN_BLOCK):
        return None
    form = kernel_form(bits, q.bits, target)
    if form == "dequantize-linear" and _relu_blocks_fusion(model, graph, node):
        return None
    k, n, stored_kn, bias = site
    return KernelSite(graph, node, k, n, stored_kn, bias, bits, group, form)


WIDEN_MAX_WEIGHTS = 1 << 28
"""Most weights a model may widen to bytes at load (multiplier scales, 8-bit kernel).

onnxruntime keeps every intermediate of its load-time folding until the pass ends:
the widening chain (UINT4 codes -> Cast(UINT8) -> Mul -> Add -> Reshape) costs about
three bytes per weight while the model loads (measured: 8 x 4096^2 weights peaked at
618 MiB, 36 x 4096^2 at 2,443 MiB against 1,757 MiB for int8 codes stored as bytes).
Up to 2^28 weights that is under 1 GiB; a larger model's multiplier weights take the
4-bit kernel in blocks of their group instead (no widening; at one input row, as in
token-by-token decoding, that kernel is the faster one)."""


def widen_allowed(tensors: dict[str, Any]) -> bool:
    """Whether the model's large 2-D MatMul/Gemm weights (TensorInfo by name) are few
    enough to widen at load (WIDEN_MAX_WEIGHTS)."""
    total = sum(info.size for info in tensors.values()
                if info.role in ("MatMul", "Gemm") and len(info.shape) == 2
                and info.size >= KERNEL8_MIN_WEIGHTS)
    return total <= WIDEN_MAX_WEIGHTS


def kernel_form(kernel: int, bits: int, target: OnnxTarget) -> str:
    """"dequantize-linear" (fused by onnxruntime) or "matmul-nbits" (written directly).

    Codes of 5-7 bits are unpacked to bytes by a folded chain; they are written
    as DequantizeLinear also for "ort" (onnxruntime fuses it into the same kernel).
    """
    if target.target == "ort" and bits == kernel:
        return "matmul-nbits"
    return "dequantize-linear"


def _matmul_site(node: onnx.NodeProto, name: str, q: Quantized,
                 model: onnx.ModelProto) -> tuple[int, int, bool, str | None] | None:
    if node.domain not in ("", "ai.onnx") or len(node.input) < 2 or node.input[1] != name:
        return None
    rows, cols = q.shape
    if node.op_type == "MatMul":
        return (rows, cols, True, None) if q.block_axis == 0 else None
    if node.op_type != "Gemm":
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0:
        return None
    bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
    if bias is not None and (attrs.get("beta", 1.0) != 1.0 or not _is_vector(model, bias)):
        return None
    trans_b = attrs.get("transB", 0)
    if trans_b:
        return (cols, rows, False, bias) if q.block_axis == 1 else None
    return (rows, cols, True, bias) if q.block_axis == 0 else None


def _is_vector(model: onnx.ModelProto, name: str) -> bool:
    """A 1-D initializer (a per-output bias both rewrites can take)."""
    for graph in graphs(model.graph):
        for tensor in graph.initializer:
            if tensor.name == name:
                return len(tensor.dims) == 1
    return False


def _relu_blocks_fusion(model: onnx.ModelProto, graph: onnx.GraphProto,
                        node: onnx.NodeProto) -> bool:
    """onnxruntime's QDQ selector skips a MatMul whose only consumer is an inner Relu/Clip."""
    out = node.output[0]
    readers = [n for n in graph.node if out in n.input]
    if len(readers) != 1 or is_output(model, out):
        return False
    return readers[0].op_type in ("Relu", "Clip") and not is_output(model, readers[0].output[0])


# -- tensors sensitive to quantization -----------------------------------------

# Ops a graph output may pass through after the output layer: shape changes and
# elementwise ops with one non-constant input (bias, scale, activation, softmax).
_PASS_THROUGH = {"Add", "Sub", "Mul", "Div", "Reshape", "Transpose", "Squeeze", "Unsqueeze",
                 "Flatten", "Identity", "Cast", "Softmax", "LogSoftmax", "Sigmoid", "Tanh",
                 "Relu", "Clip", "Dropout"}


def sensitive_tensors(model: onnx.ModelProto, roles: dict[str, tuple[str, int, int, int]],
                      sizes: dict[str, int] | None = None) -> tuple[dict[str, str], float]:
    """Tensor name -> "embedding" (Gather tables) or "head" (the output layer's weight),
    and the share of the weights' elements they hold together (0 without `sizes`).

    The head is the weight of each last MatMul/Gemm on a path to a graph output
    that passes only through shape and single-input elementwise ops. When
    every weight is sensitive there is nothing to hold them above: none is
    returned.
    """
    found = _sensitive(model, roles)
    if not sizes or not found:
        return found, 0.0
    total = sum(sizes.get(name, 0) for name in roles)
    share = sum(sizes.get(name, 0) for name in found) / total if total else 0.0
    return ({}, 0.0) if share >= 1.0 else (found, share)


def _sensitive(model: onnx.ModelProto,
               roles: dict[str, tuple[str, int, int, int]]) -> dict[str, str]:
    found = {name: "embedding" for name, role in roles.items() if role[0] == "Gather"}
    graph = model.graph
    constants = {t.name for t in graph.initializer} | {
        n.output[0] for n in graph.node if n.op_type == "Constant" and n.output}
    producer = {out: node for node in graph.node for out in node.output}
    pending, seen = [o.name for o in graph.output], set()
    while pending:
        value = pending.pop()
        node = producer.get(value)
        if node is None or value in seen or node.domain not in ("", "ai.onnx"):
            continue
        seen.add(value)
        if node.op_type in ("MatMul", "Gemm"):
            weight = node.input[1] if len(node.input) > 1 else ""
            if weight in constants and weight in roles:
                found.setdefault(weight, "head")
            continue
        dynamic = [i for i in node.input if i and i not in constants]
        if node.op_type in _PASS_THROUGH and len(dynamic) == 1:
            pending.append(dynamic[0])
    return found
