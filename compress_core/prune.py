"""Magnitude pruning: the `prune` stage (unstructured or N:M, per tensor or global)."""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, replace

import numpy as np

from modelpress.core.compose import one_of, order_error
from modelpress.core.encoded import (Dense, Encoded, LowRank, Palettized, Quantized, Scaled,
                                     Sparse, merged_shape)
from modelpress.core.sizing import ElementSize
from modelpress.core.stage import Skip, Stage, TensorValues, option
from modelpress.core.tensorinfo import TensorInfo, axes_for

_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_pattern(pattern: str) -> tuple[int, int] | None:
    """(N, M) for an 'N:M' pattern, None for 'unstructured'; ValueError says what is wrong."""
    if pattern == "unstructured":
        return None
    match = _PATTERN.match(pattern)
    if not match:
        raise ValueError(f"must be 'unstructured' or N:M such as 2:4, got {pattern!r}")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ValueError(f"{n}:{m} keeps N of every M weights, so it needs 0 < N < M (e.g. 2:4)")
    return n, m


@dataclass(frozen=True)
class Prune(Stage):
    """Magnitude pruning: zero the smallest weights.

    Unstructured pruning zeroes the smallest |w| of each tensor (--scope tensor)
    or below one threshold shared by all selected tensors (--scope global, so
    layers with small weights lose more). An N:M pattern keeps the N largest
    of every M consecutive weights along the input (reduction) dimension, the
    layout sparse tensor cores run (2:4).
    """

    id = "prune"
    summary = "magnitude pruning (unstructured or N:M; per tensor or global)"
    produces = (Sparse,)
    refusals = {
        Sparse: "use a single prune stage when it has --pattern N:M",
        LowRank: "the product of two factors has no zeros to keep; " + one_of("prune", "lowrank"),
        Palettized: "put prune first: prune -> cluster gives the pruned zeros an exact "
                    "codebook entry",
    }

    sparsity: float | None = option(
        None, "fraction of weights set to zero, in [0, 1) [default: 0.5; --pattern N:M "
        "means 1 - N/M]", min=0.0, max=1.0, max_open=True)
    pattern: str = option(
        "unstructured", "unstructured, or N:M: keep the N largest of every M weights along "
        "the input dimension (e.g. 2:4)", metavar="unstructured|N:M")
    scope: str = option(
        "tensor", "tensor: every tensor loses --sparsity of its weights; global: one "
        "magnitude threshold over all selected tensors", choices=("tensor", "global"))

    def validate(self) -> None:
        try:
            nm = parse_pattern(self.pattern)
        except ValueError as exc:
            self.fail(f"--pattern {exc}")
        if nm is None:
            if self.sparsity is None:
                object.__setattr__(self, "sparsity", 0.5)
            return
        n, m = nm
        object.__setattr__(self, "pattern", f"{n}:{m}")
        implied = 1.0 - n / m
        if self.sparsity is not None and not math.isclose(self.sparsity, implied, abs_tol=1e-9):
            self.fail(f"--sparsity {self.sparsity} contradicts --pattern {n}:{m}, which zeroes "
                      f"{implied:.4g} of the weights; leave --sparsity out")
        if self.scope == "global":
            self.fail("--scope global applies to unstructured pruning; --pattern N:M already "
                      "fixes the sparsity of every group")
        object.__setattr__(self, "sparsity", implied)

    @property
    def nm(self) -> tuple[int, int] | None:
        """(N, M) of an N:M pattern, None when unstructured."""
        return parse_pattern(self.pattern)

    # -- global scope --------------------------------------------------------

    @property
    def needs_prepare(self) -> bool:
        return self.scope == "global"

    def prepare(self, tensors: TensorValues) -> Prune:
        if not self.needs_prepare:
            return self
        bound = copy.copy(self)
        object.__setattr__(bound, "_global", global_threshold(tensors, self.sparsity))
        return bound

    # -- work ----------------------------------------------------------------

    def apply(self, encoded: Encoded, info: TensorInfo) -> Encoded:
        if isinstance(encoded, Sparse):
            if encoded.pattern != "unstructured" or self.pattern != "unstructured":
                raise order_error(self, encoded, info)
            inner = encoded.values
        else:
            inner = encoded
        if not isinstance(inner, (Dense, Quantized, Scaled)):
            raise order_error(self, inner, info)
        values = encoded.decode()
        mask = self._mask(values, info)
        if isinstance(encoded, Sparse):
            mask &= encoded.mask
        return Sparse(mask, _zeroed(inner, mask), self.pattern)

    def estimate_size(self, size: ElementSize, info: TensorInfo) -> ElementSize:
        return replace(size, kept=1.0 - self.sparsity)

    def _mask(self, values: np.ndarray, info: TensorInfo) -> np.ndarray:
        nm = self.nm
        if nm is not None:
            axis = axes_for(info)[1]
            n, m = nm
            if values.shape[axis] % m == 0:
                return nm_mask(values, n, m, axis)
            # A depthwise or grouped kernel: along each output channel's whole kernel.
            flat = merged_shape(values.shape, axis, info.block_span)
            if info.block_span > 1 and flat[axis] % m == 0:
                return nm_mask(values.reshape(flat), n, m, axis).reshape(values.shape)
            kernel = f" or its kernel's {flat[axis]}" if info.block_span > 1 else ""
            raise Skip(f"its input dimension ({values.shape[axis]}){kernel} is not a multiple "
                       f"of {m}, so --pattern {n}:{m} does not fit it")
        state = getattr(self, "_global", None)
        if state is None:  # a lone tensor: global over one tensor is per tensor
            return magnitude_mask(values, self.sparsity)
        threshold, ties = state
        return threshold_mask(values, threshold, ties.get(info.name, 0))


def magnitude_mask(values: np.ndarray, sparsity: float) -> np.ndarray:
    """Keep-mask that zeroes exactly round(sparsity * n) of the smallest |values|."""
    flat = np.abs(values).reshape(-1)
    drop = int(round(sparsity * flat.size))
    mask = np.ones(flat.size, dtype=bool)
    if drop > 0:
        # argpartition is deterministic for equal inputs, so ties break the same way each run.
        mask[np.argpartition(flat, drop - 1)[:drop]] = False
    return mask.reshape(values.shape)


def nm_mask(values: np.ndarray, n: int, m: int, axis: int) -> np.ndarray:
    """Keep-mask with exactly the n largest |values| of every m consecutive along `axis`."""
    moved = np.moveaxis(np.abs(values), axis, -1)
    groups = moved.reshape(-1, m)
    # Stable sort of -|w|: of equal magnitudes the earlier element is kept.
    order = np.argsort(-groups, axis=1, kind="stable")
    keep = np.zeros(groups.shape, dtype=bool)
    np.put_along_axis(keep, order[:, :n], True, axis=1)
    return np.moveaxis(keep.reshape(moved.shape), -1, axis)


def threshold_mask(values: np.ndarray, threshold: float | None, ties: int) -> np.ndarray:
    """Keep |values| above `threshold`; of those equal to it, drop the first `ties` (flat order)."""
    magnitude = np.abs(values.astype(np.float32))
    if threshold is None:
        return np.ones(values.shape, dtype=bool)
    mask = magnitude > np.float32(threshold)
    if ties:
        equal = np.flatnonzero(magnitude.reshape(-1) == np.float32(threshold))
        keep = mask.reshape(-1)
        keep[equal[ties:]] = True
        mask = keep.reshape(values.shape)
    return mask


def global_threshold(tensors: TensorValues,
                     sparsity: float) -> tuple[float | None, dict[str, int]]:
    """The |w| threshold that zeroes round(sparsity * n) of all weights together.

    Exact, in two passes that each hold one tensor at a time: non-negative
    float32 values order like their bit patterns, so a histogram of the top
    16 bits finds the bucket holding the threshold and a histogram of the low
    16 bits inside that bucket finds the value. Returns the threshold (None
    when nothing is dropped) and, per tensor, how many elements equal to it
    are dropped (so the total is exact even with ties).
    """
    high = np.zeros(1 << 16, dtype=np.int64)
    total = 0
    for _, values in tensors():
        bits = _magnitude_bits(values)
        high += np.bincount(bits >> 16, minlength=1 << 16)
        total += bits.size
    drop = int(round(sparsity * total))
    if drop == 0:
        return None, {}
    cum_high = np.cumsum(high)
    bucket = int(np.searchsorted(cum_high, drop))
    below = int(cum_high[bucket] - high[bucket])
    low = np.zeros(1 << 16, dtype=np.int64)
    per_tensor: list[tuple[str, np.ndarray, np.ndarray]] = []
    for info, values in tensors():
        bits = _magnitude_bits(values)
        inside = (bits[(bits >> 16) == bucket] & 0xFFFF).astype(np.int64)
        counts = np.bincount(inside, minlength=1 << 16)
        low += counts
        found = np.flatnonzero(counts)
        per_tensor.append((info.name, found, counts[found]))
    cum_low = np.cumsum(low)
    slot = int(np.searchsorted(cum_low, drop - below))
    below += int(cum_low[slot] - low[slot])
    threshold = float(np.array([(bucket << 16) | slot], dtype=np.uint32).view(np.float32)[0])
    remaining = drop - below
    ties: dict[str, int] = {}
    for name, found, counts in per_tensor:
        if remaining <= 0:
            break
        hit = np.searchsorted(found, slot)
        if hit < found.size and found[hit] == slot:
            take = min(remaining, int(counts[hit]))
            ties[name] = take
            remaining -= take
    return threshold, ties


def _magnitude_bits(values: np.ndarray) -> np.ndarray:
    return np.abs(np.asarray(values, dtype=np.float32)).reshape(-1).view(np.uint32)


def _zeroed(encoded: Encoded, mask: np.ndarray) -> Encoded:
    """The same encoding with every element outside `mask` exactly zero."""
    if isinstance(encoded, Quantized):
        # Zero is exact on the grid: the zero-point code decodes to 0.0.
        return encoded.with_codes(np.where(mask, encoded.codes, encoded.zero_codes()))
    if isinstance(encoded, Scaled):
        values = encoded.values
        return encoded.with_values(np.where(mask, values, np.zeros((), dtype=values.dtype)))
    array = encoded.array
    return Dense(np.where(mask, array, np.zeros((), dtype=array.dtype)))
