"""Input rows of a weight's layer and their running sums: mean, variance and X^T X.

A MatMul/Gemm weight's input rows are the activation's last axis (Gemm with
transA=1: its first). A Conv weight [M, C/group, *kernel] multiplies the
im2col rows of its input: one row per sample and output position, per
group, holding the C/group x kernel input values the kernel covers there
(zero where it reaches into the padding), in the order of the weight's
flattened kernel. The rows are made here as the convolution sees them:
strides, dilations, explicit pads and auto_pad honoured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import onnx

from modelpress.core.blas import one_blas_thread

BLOCK_ELEMENTS = 1 << 22
"""Input-row elements made and multiplied at a time (bounds the im2col copy)."""


@dataclass(frozen=True)
class ConvGeometry:
    """How a Conv node slides its kernel over its input."""

    group: int
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    pads: tuple[int, ...]        # begin of each spatial axis, then end of each
    auto_pad: str

    @classmethod
    def of(cls, node: onnx.NodeProto, weight_dims: tuple[int, ...]) -> ConvGeometry:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        kernel = tuple(int(d) for d in weight_dims[2:])
        n = len(kernel)
        auto_pad = attrs.get("auto_pad", b"NOTSET")
        return cls(group=int(attrs.get("group", 1)), kernel=kernel,
                   strides=tuple(attrs.get("strides", (1,) * n)),
                   dilations=tuple(attrs.get("dilations", (1,) * n)),
                   pads=tuple(attrs.get("pads", (0,) * (2 * n))),
                   auto_pad=auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad)

    def padding(self, spatial: tuple[int, ...]) -> list[tuple[int, int]]:
        """(begin, end) zero padding of each spatial axis of an input of that size."""
        n = len(self.kernel)
        if self.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
            out = []
            for size, k, s, d in zip(spatial, self.kernel, self.strides, self.dilations):
                total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
                small = total // 2
                out.append((small, total - small) if self.auto_pad == "SAME_UPPER"
                           else (total - small, small))
            return out
        if self.auto_pad == "VALID":
            return [(0, 0)] * n
        return [(self.pads[i], self.pads[i + n]) for i in range(n)]


def conv_rows(x: np.ndarray, geometry: ConvGeometry) -> Iterator[np.ndarray]:
    """The im2col rows of `x` [N, C, *spatial] as blocks [group, rows, C/group x kernel]."""
    g = geometry
    n = len(g.kernel)
    padded = np.pad(x, [(0, 0), (0, 0)] + g.padding(tuple(x.shape[2:])))
    extent = tuple((k - 1) * d + 1 for k, d in zip(g.kernel, g.dilations))
    if any(e > size for e, size in zip(extent, padded.shape[2:])):
        return
    windows = np.lib.stride_tricks.sliding_window_view(padded, extent, axis=tuple(range(2, 2 + n)))
    # [N, C, *positions, *window]: keep every stride-th position and dilation-th tap.
    picks = (slice(None), slice(None)) + tuple(slice(None, None, s) for s in g.strides) + tuple(
        slice(None, None, d) for d in g.dilations)
    windows = windows[picks]
    samples, channels = windows.shape[:2]
    positions = windows.shape[2:2 + n]
    per_group = channels // g.group
    k = per_group * math.prod(g.kernel)
    # [N, group, C/group, *positions, *kernel] -> [group, N, *positions, C/group, *kernel]
    split = windows.reshape((samples, g.group, per_group) + positions + g.kernel)
    order = (1, 0) + tuple(range(3, 3 + n)) + (2,) + tuple(range(3 + n, 3 + 2 * n))
    grouped = split.transpose(order)
    first = max(1, BLOCK_ELEMENTS // max(g.group * k * math.prod(positions[1:]), 1))
    for sample in range(samples):
        for start in range(0, positions[0], first):
            block = grouped[:, sample, start:start + first]
            yield np.ascontiguousarray(block, dtype=np.float32).reshape(g.group, -1, k)


def matmul_rows(value: np.ndarray, k: int, k_first: bool) -> Iterator[np.ndarray]:
    """A MatMul/Gemm input's rows as blocks [1, rows, K] (nothing if K does not fit)."""
    rows = value.T if (k_first and value.ndim == 2) else value
    if rows.ndim < 1 or rows.shape[-1] != k:
        return
    rows = rows.reshape(-1, k)
    step = max(1, BLOCK_ELEMENTS // max(k, 1))
    for start in range(0, rows.shape[0], step):
        yield np.ascontiguousarray(rows[start:start + step], dtype=np.float32)[None]


class Sums:
    """Running sums of one weight's input rows: per input, sum and sum of squares
    (float64); optionally X^T X (each block's product in float32, summed in float64)
    and, per group, the sums that estimate how noisy its entries are: sum over rows
    of |x|^4 and of sum_i x_i^4 (see `shrunk_moments`)."""

    def __init__(self, groups: int, k: int, moments: bool) -> None:
        self.total = np.zeros((groups, k))
        self.square = np.zeros((groups, k))
        self.product = np.zeros((groups, k, k)) if moments else None
        self.norm4 = np.zeros(groups)
        self.fourth = np.zeros(groups)
        self.rows = 0

    def add(self, block: np.ndarray) -> bool:
        """Add a block [groups, rows, K]; False (nothing added) if it holds NaN or Inf."""
        total = block.sum(axis=1, dtype=np.float64)
        squares = np.square(block, dtype=np.float64)
        square = squares.sum(axis=1)
        if not (np.isfinite(total).all() and np.isfinite(square).all()):
            return False
        self.total += total
        self.square += square
        if self.product is not None:
            with one_blas_thread():  # a threaded product rounds with the thread count
                self.product += np.matmul(block.transpose(0, 2, 1), block)
            self.norm4 += np.square(squares.sum(axis=2)).sum(axis=1)
            self.fourth += np.square(squares).sum(axis=(1, 2))
        self.rows += block.shape[1]
        return True


def shrunk_moments(sums: Sums) -> np.ndarray:
    """H = X^T X / rows [groups, K, K] (float64), each group's off-diagonal entries shrunk
    towards 0 by the share of their square that is estimation noise (Schafer & Strimmer
    2005, target "diagonal"; Ledoit-Wolf style): from few rows, H's off-diagonal entries
    are mostly noise, and GPTQ would fit its codes to it."""
    n = sums.rows
    h = sums.product / max(n, 1)
    if n < 2:
        return h
    diagonal = np.diagonal(h, axis1=1, axis2=2)
    off = np.square(h).sum(axis=(1, 2)) - np.square(diagonal).sum(axis=1)
    # sum over i != j of the variance of h_ij: (sum_rows sum_{i!=j} x_i^2 x_j^2 - n off) / n(n-1)
    noise = (sums.norm4 - sums.fourth - n * off) / (n * (n - 1.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.clip(np.where(off > 0, noise / off, 0.0), 0.0, 1.0)
    shrunk = h * (1.0 - share)[:, None, None]
    index = np.arange(h.shape[1])
    shrunk[:, index, index] = diagonal
    return shrunk
