"""Weight clustering: the `cluster` stage (1-D k-means codebooks, as in palettization)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from modelpress.core.compose import apply_to_factors, one_of, order_error
from modelpress.core.dtypes import own_float
from modelpress.core.encoded import Dense, Encoded, LowRank, Palettized, Quantized, Scaled, Sparse
from modelpress.core.kmeans import kmeans_rows
from modelpress.core.sizing import ElementSize, per_element, value_bits_of
from modelpress.core.stage import Stage, option
from modelpress.core.tensorinfo import TensorInfo, axes_for


@dataclass(frozen=True)
class Cluster(Stage):
    """Weight clustering: each weight becomes an index into a codebook of k values.

    The codebook is a 1-D k-means of the tensor's weights (or of each output
    channel's with --per-channel), started from quantiles, so it is
    deterministic. After prune, the pruned zeros get an exact 0 entry of
    their own and the kept weights share the other k - 1.
    """

    id = "cluster"
    summary = "weight clustering: a k-means codebook per tensor or channel"
    produces = (Palettized,)
    refusals = {
        Quantized: one_of("quantize", "cluster"),
        Scaled: one_of("cast", "cluster"),
        Palettized: "keep one cluster stage per tensor",
    }

    bits: int | None = option(None, "index bits: a codebook of 2^bits values (1-8) "
                              "[default: 4 unless --clusters is given]", min=1, max=8)
    clusters: int | None = option(None, "codebook size, 2-256 (indices take "
                                  "ceil(log2(clusters)) bits)", min=2, max=256)
    per_channel: bool = option(False, "one codebook per output channel instead of per tensor")

    def validate(self) -> None:
        if self.bits is None and self.clusters is None:
            object.__setattr__(self, "bits", 4)
        if self.bits is not None:
            if self.clusters is not None and self.clusters != 2 ** self.bits:
                self.fail(f"--clusters {self.clusters} contradicts --bits {self.bits} "
                          f"({2 ** self.bits} clusters); give one of them")
            object.__setattr__(self, "clusters", 2 ** self.bits)

    def apply(self, encoded: Encoded, info: TensorInfo) -> Encoded:
        if isinstance(encoded, Sparse) and isinstance(encoded.values, Dense):
            return Sparse(encoded.mask, self._palettize(encoded.values.array, info, encoded.mask),
                          encoded.pattern)
        if isinstance(encoded, LowRank) and isinstance(encoded.left, Dense):
            return apply_to_factors(self, encoded, info)
        if not isinstance(encoded, Dense):
            raise order_error(self, encoded, info)
        return self._palettize(encoded.array, info, None)

    def estimate_size(self, size: ElementSize, info: TensorInfo) -> ElementSize:
        value_bits = float(math.ceil(math.log2(self.clusters)))
        books = per_element("channel" if self.per_channel else "tensor", info, None)
        return replace(size, value_bits=value_bits,
                       side=self.clusters * value_bits_of(info) * books)

    def _palettize(self, array: np.ndarray, info: TensorInfo,
                   mask: np.ndarray | None) -> Palettized:
        channel_axis = axes_for(info)[0] if self.per_channel and array.ndim >= 2 else None
        return palettize(array.astype(np.float32), self.clusters, channel_axis, mask,
                         own_float(array.dtype))


def palettize(w: np.ndarray, clusters: int, channel_axis: int | None,
              mask: np.ndarray | None, lut_dtype: np.dtype) -> Palettized:
    """Cluster `w` into codebooks of `clusters` entries.

    With a keep-mask, entry 0 of every codebook is exactly 0 and holds the
    pruned positions; the kept weights are clustered into the other entries.
    """
    shell = Palettized(np.zeros((1 if channel_axis is None else w.shape[channel_axis], 1)),
                       np.zeros(w.shape, np.uint8), channel_axis)
    rows = shell.rows(w)
    n_rows, width = rows.shape
    row_ids = np.repeat(np.arange(n_rows), width)
    flat = rows.reshape(-1)
    keep = None if mask is None else shell.rows(mask).reshape(-1)
    k = clusters - (1 if keep is not None else 0)
    if keep is None:
        centroids, index = kmeans_rows(flat, row_ids, n_rows, k)
    else:
        centroids, kept_index = kmeans_rows(flat[keep], row_ids[keep], n_rows, k)
        centroids = np.concatenate([np.zeros((n_rows, 1)), centroids], axis=1)
        index = np.zeros(flat.size, dtype=np.int64)
        index[keep] = kept_index + 1
    lut = centroids.astype(lut_dtype)
    indices = shell.unrows(index.astype(np.uint8).reshape(n_rows, width))
    return Palettized(lut, np.require(indices, requirements="C"), channel_axis,  # keeps 0-d
                      0 if keep is not None else None)
