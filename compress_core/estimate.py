"""Expected output size of a recipe on a model, from tensor headers alone (for --dry-run).

An estimate, not a measurement: for every tensor the recipe selects, the bits
each element will take (codes at the recipe's bit width in the storage the
format uses, kept values and a 1-bit mask after pruning where the format
stores sparsity, plus scales and zero points spread over their elements)
times its element count; everything else keeps its bytes. Container overhead
(ONNX nodes, headers) is not counted. Stages without a rule here are assumed
to leave the size unchanged, and the estimate says so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .dtypes import scale_dtype_for
from .pipeline import Options, plan
from .recipe import Recipe
from .stage import Stage
from .tensorinfo import TensorInfo


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
    kept, side = 1.0, 0.0
    for stage in stages:
        if stage.id == "quantize":
            value_bits = _code_bits(stage.bits, fmt)
            side = _scale_bits(stage, info, fmt)
        elif stage.id == "prune":
            kept = 1.0 - stage.sparsity
        elif hasattr(stage, "estimate_bits"):
            value_bits = float(stage.estimate_bits(info, value_bits))
        elif stage.id not in unknown:
            unknown.append(stage.id)
    if kept < 1.0 and fmt == "safetensors":
        # Sparse layouts store kept values and a 1-bit mask, unless dense is smaller.
        value_bits = min(value_bits, kept * value_bits + 1.0)
    return value_bits + side


def _code_bits(bits: int, fmt: str) -> float:
    if fmt == "onnx":  # INT4 holds 2..4-bit codes, INT8 holds 5..8-bit codes
        return 4.0 if bits <= 4 else 8.0
    return float(bits)


def _scale_bits(stage: Any, info: TensorInfo, fmt: str) -> float:
    """Scale (and zero point) bits spread over the elements they serve."""
    from .quantize import axes_for
    per_scale = scale_dtype_for(info.dtype).itemsize * 8
    if stage.scheme == "asym":
        per_scale += 8 if fmt == "onnx" else stage.bits
    if stage.granularity == "group":
        return per_scale / stage.group_size
    if stage.granularity == "channel":
        channel_axis, _ = axes_for(info)
        channels = info.shape[channel_axis] if channel_axis is not None else 1
        return per_scale * channels / info.size
    return per_scale / info.size
