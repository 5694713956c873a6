"""The group size of an 8-bit ONNX weight, chosen from its values by rate and distortion.

`quantize --bits 8` in ONNX stores codes of 8 bits with one 8-bit scale code
per group of inputs (`quantize.coded`). Smaller groups cost more scale codes
and follow the weights' local range more closely; what that buys depends on
the tensor: one with a few outlier rows or channels loses a lot in long
groups, one of evenly spread weights hardly anything. Each tensor gets the
group size, a power of two from MIN_GROUP up to `former_group` (the rule the
default used before), that minimises

    weight * relative squared error + PRICE * side bits / mean weight size

Side bits are the scale codes (and zero points) the groups store; `weight` is
SENSITIVE_WEIGHT for embeddings and the output head (their error reaches the
outputs directly: on the sample transformer the output's squared error per
unit of relative squared weight error measured 0.21-0.75 for them, 0.02-0.21
for the other MatMuls, 0.11 on average) and 1 otherwise; the mean weight size is that of the model's weight tensors
(`TensorInfo.mean_weight_size`). Pricing side bits against the mean tensor,
not the tensor itself, counts every layer's relative error as worth the same
to the output, so a small layer's finer groups cost the model little (priced
against each tensor's own size, the cheap early layers of open_nsfw, the
ones its output is most sensitive to, kept long groups).

Groups never get longer than `former_group`'s: at a PRICE that keeps the
extra bytes within 2% where finer groups pay most (the benchmarks' 55M
synthetic transformer, whose weights have outlier channels), longer groups
won bytes on models of evenly spread weights (the sample MLP, CNN and
transformer: 1-4% fewer bytes) at 4-20% more output error. So the choice only
spends bytes where they buy error, and no tensor is coarser than before.

The squared error of each size is computed from its groups' ranges: the
smallest scale that covers a group, squared, over 12 per weight (rounding
error is uniform at 8 bits). The scale code rounds that scale up by less than
one step of its log grid (a few percent of squared error with 8-bit codes,
much the same for every size), which is left out. One pass over the tensor
serves every size: the ranges of the smallest groups, folded pairwise into
those of the larger ones. benchmarks/int8_grouping.py prints how close the
estimate comes to the exact error of the size chosen.

2-D float32 MatMul/Gemm weights of KERNEL8_MIN_WEIGHTS elements or more run in
onnxruntime's 8-bit kernel only in groups of KERNEL8_MIN_BLOCK or more
(`modelpress.formats.onnx.sites`); their sizes start there, so the choice
costs no run time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np

from modelpress.core.tensorinfo import TensorInfo, axes_for

# The price of one side bit per weight of a mean-sized tensor, in relative squared
# error: set with benchmarks/int8_grouping.py so that the default's bytes stay within
# about 2% of the former rule's on the sample models, magika, open_nsfw and the 55M
# synthetic transformer (which spends the most: +2.1%; at 5e-5 it spent +4.1%).
PRICE = 7.5e-5
SENSITIVE_WEIGHT = 4.0
MIN_GROUP = 4
FORMER_MIN_GROUP = 16
FORMER_MAX_GROUP = 128
KERNEL8_MIN_WEIGHTS = 1 << 20  # as modelpress.formats.onnx.sites.KERNEL8_MIN_WEIGHTS (tested)
KERNEL8_MIN_BLOCK = 64         # as modelpress.formats.onnx.sites.KERNEL8_MIN_BLOCK (tested)


@dataclass(frozen=True)
class Candidate:
    """One group size for a tensor: its estimated relative squared error and side bits."""

    group_size: int
    error: float      # sum of squared rounding errors / sum of squared weights (estimated)
    side_bits: int    # scale codes (and zero points) it stores


def former_group(k: int) -> int:
    """Smallest power of two >= max(16, k / 5), at most 128: the rule 8-bit groups followed
    before they were chosen from the values; now the longest a tensor gets, and the
    size --dry-run estimates with.

    Five 8-bit scale codes per channel cost 40 bits, what a float32 scale and
    an 8-bit zero point per channel cost (NNCF's INT8_ASYM layout). Wide
    layers stop at 128 inputs per scale: one outlier then widens the step of
    fewer weights. On the benchmark's 55M synthetic transformer (K 768 and
    3072) groups of 256/1024 measured 37.5 dB weight SQNR and 0.0444 output
    error, groups of 128 39.4 dB and 0.0340, for 0.06 more bits per weight.
    """
    group = FORMER_MIN_GROUP
    while group < k and group * 5 < k and group < FORMER_MAX_GROUP:
        group *= 2
    return group


def kernel_sized(info: TensorInfo) -> bool:
    """A weight onnxruntime's 8-bit kernel takes when its groups allow (see the module doc)."""
    return (info.role in ("MatMul", "Gemm") and len(info.shape) == 2
            and np.dtype(info.dtype) == np.float32 and info.size >= KERNEL8_MIN_WEIGHTS)


def candidate_groups(info: TensorInfo, k: int) -> list[int]:
    """Powers of two from MIN_GROUP (KERNEL8_MIN_BLOCK for `kernel_sized` weights) up to
    `former_group(k)` or the first that holds all k inputs (one group per row), whichever
    comes first; `former_group(k)` alone when it is below the start."""
    longest = former_group(k)
    group = KERNEL8_MIN_BLOCK if kernel_sized(info) else MIN_GROUP
    sizes = []
    while group <= longest:
        sizes.append(group)
        if group >= k:
            break
        group *= 2
    return sizes or [longest]


def choose_group(w: np.ndarray, info: TensorInfo, *, bits: int, scale_bits: int,
                 zero_bits: int | None) -> int:
    """The group size of least `weight * error + PRICE * side bits / mean size` for `w`
    among `candidates` (see the module doc)."""
    found = candidates(w, info, bits=bits, scale_bits=scale_bits, zero_bits=zero_bits)
    if len(found) == 1:
        return found[0].group_size
    weight = SENSITIVE_WEIGHT if info.sensitive else 1.0
    mean_size = info.mean_weight_size or w.size
    return min(found, key=lambda c: weight * c.error + PRICE * c.side_bits / mean_size).group_size


def candidates(w: np.ndarray, info: TensorInfo, *, bits: int, scale_bits: int,
               zero_bits: int | None) -> list[Candidate]:
    """Each of `candidate_groups` with its estimated error for `w` (float32 or float16);
    `zero_bits` is None for symmetric codes. A tensor whose weights cannot tell them apart
    (all zeros, NaN/Inf, fewer than 2 dims) gets only the longest, without an estimate."""
    _, block_axis = axes_for(info)
    k = w.shape[block_axis] if w.ndim else 1
    groups = candidate_groups(info, k)
    flat = w.reshape(-1)
    energy = float(np.dot(flat, flat)) if flat.dtype == np.float32 else float(
        np.square(flat, dtype=np.float64).sum())
    if len(groups) == 1 or w.ndim < 2 or energy == 0.0 or not math.isfinite(energy):
        return [Candidate(groups[-1], math.nan, 0)]
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    per_scale = scale_bits + (zero_bits or 0)
    found = []
    for group, (lo, hi) in zip(groups, _folded_ranges(w, block_axis, groups[0], len(groups))):
        error = _squared_error(lo, hi, k, group, qmin, qmax, zero_bits is not None)
        found.append(Candidate(group, error / energy, lo.size * per_scale))
    return found


def _folded_ranges(w: np.ndarray, block_axis: int, first: int,
                   levels: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(min, max) of each group along `block_axis`, as float32 [lead, groups, rest] arrays,
    for groups of `first`, then twice that, ... (`levels` sizes, each from the one before)."""
    lead = math.prod(w.shape[:block_axis])
    k = w.shape[block_axis]
    rest = math.prod(w.shape[block_axis + 1:])
    data = np.ascontiguousarray(w).reshape(lead, k, rest)
    count = -(-k // first)
    if count * first != k:  # a ragged last group: zeros are neutral to both ends
        padded = np.zeros((lead, count * first, rest), data.dtype)
        padded[:, :k] = data
        data = padded
    split = data.reshape(lead, count, first, rest)
    # Elementwise over the group's positions: numpy's reductions along a short axis
    # are several times slower.
    lo, hi = split[:, :, 0].copy(), split[:, :, 0].copy()
    for j in range(1, first):
        np.minimum(lo, split[:, :, j], out=lo)
        np.maximum(hi, split[:, :, j], out=hi)
    lo, hi = lo.astype(np.float32, copy=False), hi.astype(np.float32, copy=False)
    for level in range(levels):
        yield lo, hi
        if level + 1 < levels:
            lo, hi = _pairwise(lo, np.minimum), _pairwise(hi, np.maximum)


def _pairwise(values: np.ndarray, reduce: np.ufunc) -> np.ndarray:
    """Adjacent groups along axis 1 combined (an odd last one with zero)."""
    if values.shape[1] % 2:
        values = np.concatenate([values, np.zeros_like(values[:, :1])], axis=1)
    return reduce(values[:, 0::2], values[:, 1::2])


def _squared_error(lo: np.ndarray, hi: np.ndarray, k: int, group: int, qmin: int, qmax: int,
                   asymmetric: bool) -> float:
    """Sum of squared rounding errors of groups of `group` along an axis of `k`: per
    group, its weights (the last group of a row may hold fewer) times scale^2 / 12.

    The scale is the smallest that covers the group: asymmetric codes span
    its range with a zero point, symmetric ones its largest magnitude. A
    group of zeros has no error.
    """
    if asymmetric:
        reach = np.maximum(hi, 0)
        reach -= np.minimum(lo, 0)
        steps = qmax - qmin
    else:
        reach = np.maximum(np.negative(lo), hi)
        steps = qmax
    flat = reach.reshape(-1)
    total = group * float(np.dot(flat, flat))
    short = group * lo.shape[1] - k   # weights missing from each row's last group
    if short:
        last = np.ascontiguousarray(reach[:, -1]).reshape(-1)
        total -= short * float(np.dot(last, last))
    return total / (12.0 * steps * steps)
