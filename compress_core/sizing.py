"""Estimated stored bits per element of a tensor, as each stage leaves it (for --dry-run).

Each stage maps an `ElementSize` to the next (`Stage.estimate_size`), from
tensor headers alone; `modelpress.core.estimate` folds them over a recipe.
"""

from __future__ import annotations

from dataclasses import dataclass

from modelpress.core.tensorinfo import TensorInfo, axes_for


@dataclass(frozen=True)
class ElementSize:
    """Estimated bits of one tensor per element of its dense shape.

    `value_bits`: each stored value (codes, floats, indices); `side`: scales,
    zero points or codebooks spread over the elements; `kept`: the fraction
    of elements pruning keeps; `stored`: values stored per element of the
    dense tensor (below 1 for low-rank factors); `from_values`: some stage
    chooses part of its layout from the values (quantize's 8-bit groups in
    ONNX), so `side` is that stage's rule-of-thumb guess.
    """

    value_bits: float
    side: float = 0.0
    kept: float = 1.0
    stored: float = 1.0
    from_values: bool = False


def value_bits_of(info: TensorInfo) -> float:
    """Bits of one element in the tensor's own dtype (codebooks keep it)."""
    return float(info.dtype.itemsize * 8)


def per_element(granularity: str, info: TensorInfo, group_size: int | None) -> float:
    """Scales (or codebooks) per element: one per group, per output channel, or per tensor."""
    if granularity == "group":
        return 1.0 / group_size
    if granularity == "channel":
        channel_axis, _ = axes_for(info)
        channels = info.shape[channel_axis] if channel_axis is not None else 1
        return channels / info.size
    return 1.0 / info.size
