"""How quantization lays a tensor out in groups that share a scale, and rounds scales
to the dtype they are stored in; shared by the float-scale and the scale-code kernels."""

from __future__ import annotations

from typing import Any

import numpy as np

from modelpress.core.encoded import Encoded, LowRank, Quantized, Sparse


class GroupView:
    """Reshapes a tensor so each row of a 2-D array shares one scale, and back."""

    def __init__(self, shape: tuple[int, ...], granularity: str, channel_axis: int | None,
                 block_axis: int, group_size: int | None) -> None:
        self.shape, self.granularity = shape, granularity
        self.channel_axis, self.block_axis, self.group_size = channel_axis, block_axis, group_size

    def rows(self, w: np.ndarray) -> np.ndarray:
        if self.granularity == "tensor":
            return w.reshape(1, -1)
        if self.granularity == "channel":
            return np.moveaxis(w, self.channel_axis, 0).reshape(self.shape[self.channel_axis], -1)
        moved = np.moveaxis(w, self.block_axis, -1)
        k, gs = moved.shape[-1], self.group_size
        if k % gs == 0:  # whole groups: a view when the block axis is the last (no copy)
            return moved.reshape(-1, gs)
        groups = -(-k // gs)
        # Zero padding is neutral: zero is exactly representable on every grid.
        padded = np.zeros(moved.shape[:-1] + (groups * gs,), dtype=np.float32)
        padded[..., :k] = moved
        return padded.reshape(-1, gs)

    def restore(self, rows: np.ndarray) -> np.ndarray:
        if self.granularity == "tensor":
            return rows.reshape(self.shape)
        if self.granularity == "channel":
            moved_shape = (self.shape[self.channel_axis],) + tuple(
                d for i, d in enumerate(self.shape) if i != self.channel_axis)
            return np.moveaxis(rows.reshape(moved_shape), 0, self.channel_axis)
        lead = tuple(d for i, d in enumerate(self.shape) if i != self.block_axis)
        k = self.shape[self.block_axis]
        flat = rows.reshape(lead + (-1,))[..., :k]
        return np.ascontiguousarray(np.moveaxis(flat, -1, self.block_axis))

    def per_group(self, values: np.ndarray) -> np.ndarray:
        """One value per row, laid out with the tensor's rank (see Quantized)."""
        ndim = len(self.shape)
        if self.granularity == "tensor":
            return values.reshape((1,) * ndim)
        if self.granularity == "channel":
            shape = [1] * ndim
            shape[self.channel_axis] = self.shape[self.channel_axis]
            return values.reshape(shape)
        lead = tuple(d for i, d in enumerate(self.shape) if i != self.block_axis)
        return np.ascontiguousarray(np.moveaxis(values.reshape(lead + (-1,)), -1, self.block_axis))


def stored_scale(scale: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """The scale as it will be stored, back in float32; never zero or non-finite."""
    stored = scale.astype(dtype).astype(np.float32)
    bad = ~np.isfinite(stored) | (stored <= 0)
    if bad.any():
        stored = np.where(bad, np.float32(1.0), stored)
    return stored


def stored_scale_up(scale: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """The smallest scale of `dtype` not below `scale`, back in float32 (see `stored_scale`)."""
    stored = stored_scale(scale, dtype)
    low = stored < scale
    if np.dtype(dtype).itemsize == 2 and low.any():
        # For positive values the next bit pattern is the next larger value.
        bits = stored.astype(dtype).view(np.uint16)
        bits[low] += 1
        stored = stored_scale(bits.view(dtype).astype(np.float32), dtype)
    return stored


def used_layout(encoded: Encoded, granularity: str,
                 group_size: int | None) -> tuple[Any, Any]:
    """The granularity and group size of the Quantized nodes in `encoded` (under a prune
    mask, or each low-rank factor's: a list when the factors differ); the given ones
    when it holds none."""
    nodes = []
    pending = [encoded]
    while pending:
        node = pending.pop()
        if isinstance(node, Quantized):
            nodes.append((node.granularity, node.group_size))
        elif isinstance(node, Sparse):
            pending.append(node.values)
        elif isinstance(node, LowRank):
            pending += [node.right, node.left]
    if not nodes:
        return granularity, group_size
    if len(set(nodes)) == 1:
        return nodes[0]
    return [n[0] for n in nodes], [n[1] for n in nodes]
