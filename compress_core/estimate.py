"""Expected output size of a recipe on a model, from tensor headers alone (for --dry-run).

An estimate, not a measurement: for every tensor the recipe selects, the bits
each element will take (codes at the recipe's bit width in the storage the
format uses, cast values at their float width, codebook indices, kept values
and a 1-bit mask after pruning where the format stores sparsity, the two
factors of a low-rank stage given --rank or --rank-ratio, plus scales, zero
points and codebooks spread over their elements) times its element count;
everything else keeps its bytes. Container overhead (ONNX nodes, headers) is
not counted. Stages without a rule (lowrank --energy, whose rank depends on
the data) are assumed to leave the size unchanged, and the estimate says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from modelpress.core.dtypes import scale_dtype_for
from modelpress.core.pipeline import Options, plan
from modelpress.core.recipe import Recipe
from modelpress.core.stage import Stage
from modelpress.core.tensorinfo import TensorInfo, axes_for


@dataclass
class Estimate:
    """Bytes on disk now and the estimated bytes after compression."""

    bytes_before: int
    bytes_after: int
    tensors: int
    unknown_stages: list[str] = field(default_factory=list)


def estimate(store: Any, recipe: Recipe, options: Options = Options()) -> Estimate:
    """Estimate the output size of `recipe` on an opened model, reading no tensor data."""
    unknown: list[str] = []
    before = after = count = 0
    for name, stages in plan(store, recipe, options).items():
        info = store.tensors[name]
        if not info.is_float or info.size == 0:
            continue
        bits = element_bits(info, stages, store.format, unknown)
        before += info.nbytes
        after += math.ceil(info.size * bits / 8)
        count += 1
    return Estimate(store.file_bytes, store.file_bytes - before + after, count, unknown)


def element_bits(info: TensorInfo, stages: list[Stage], fmt: str, unknown: list[str]) -> float:
    """Estimated stored bits per element of a tensor after `stages`, in format `fmt`."""
    value_bits = float(info.dtype.itemsize * 8)
    kept, side, stored = 1.0, 0.0, 1.0   # stored: elements kept per element (low-rank)
    for stage in stages:
        if stage.id == "quantize":
            plan = stage.plan(info)
            value_bits = float(plan.bits)
            side = _per_scale_bits(plan, info, fmt) * _scales(plan.granularity, info,
                                                              plan.group_size)
        elif stage.id == "prune":
            kept = 1.0 - stage.sparsity
        elif stage.id == "cast":
            from modelpress.core.cast import cast_dtype
            value_bits = float(cast_dtype(stage.dtype).itemsize * 8)
            side = 0.0 if stage.scale == "none" else scale_dtype_for(info.dtype).itemsize * 8 \
                * _scales(stage.scale, info, None)
        elif stage.id == "cluster":
            value_bits = float(math.ceil(math.log2(stage.clusters)))
            books = _scales("channel" if stage.per_channel else "tensor", info, None)
            side = stage.clusters * value_bits_of(info) * books
        elif stage.id == "lowrank" and stage.energy is None:
            stored = _lowrank_fraction(stage, info)
        elif hasattr(stage, "estimate_bits"):
            value_bits = float(stage.estimate_bits(info, value_bits))
        elif stage.id not in unknown:
            unknown.append(stage.id)   # e.g. lowrank --energy: the rank depends on the data
    if kept < 1.0 and fmt == "safetensors":
        # Sparse layouts store kept values and a 1-bit mask, unless dense is smaller.
        value_bits = min(value_bits, kept * value_bits + 1.0)
    return value_bits * stored + side


def value_bits_of(info: TensorInfo) -> float:
    """Bits of one element in the tensor's own dtype (codebooks keep it)."""
    return float(info.dtype.itemsize * 8)


def _lowrank_fraction(stage: Any, info: TensorInfo) -> float:
    """Elements of the two factors over the matrix's; 1 when the stage leaves it alone."""
    if len(info.shape) != 2:
        return 1.0
    m, n = info.shape
    rank = min(stage.rank, m, n) if stage.rank is not None else \
        max(1, int(round(stage.rank_ratio * min(m, n))))
    return 1.0 if rank * (m + n) >= m * n else rank * (m + n) / (m * n)


def _per_scale_bits(plan: Any, info: TensorInfo, fmt: str) -> float:
    """Bits of one scale (and its zero point) of a quantized tensor (codes are bit-packed)."""
    bits = plan.scale_bits or scale_dtype_for(info.dtype).itemsize * 8
    if plan.super_block:
        from modelpress.core.quantize.multiplier import applies
        from modelpress.core.quantize.scalecode import MULTIPLIER_BITS
        if applies(info.shape, axes_for(info)[1], plan.group_size, plan.super_block):
            # A 4-bit multiplier per group, a float16 base per super-block.
            bits = MULTIPLIER_BITS + 16 * plan.group_size / plan.super_block
    if not plan.symmetric:
        bits += plan.zero_bits or plan.bits
    return float(bits)


def _scales(granularity: str, info: TensorInfo, group_size: int | None) -> float:
    """Scales (or codebooks) per element: one per group, per output channel, or per tensor."""
    if granularity == "group":
        return 1.0 / group_size
    if granularity == "channel":
        channel_axis, _ = axes_for(info)
        channels = info.shape[channel_axis] if channel_axis is not None else 1
        return channels / info.size
    return 1.0 / info.size
