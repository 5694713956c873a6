"""Deterministic 1-D k-means (Lloyd's algorithm on sorted data), many rows at once.

Each row of values gets its own k centroids. Values are sorted once; after
that a Lloyd step needs only a binary search for each boundary between
neighbouring centroids and prefix sums, so it costs O(rows * k * log n)
instead of O(n * k). Rows of any lengths are handled together by sorting
64-bit keys (row number in the high half, an order-preserving image of the
float32 value in the low half). The start is the quantiles of each row, so
the result depends on the data only: the same input gives the same bytes.
"""

from __future__ import annotations

import numpy as np

MAX_ITERATIONS = 300


def kmeans_rows(values: np.ndarray, rows: np.ndarray, n_rows: int,
                k: int) -> tuple[np.ndarray, np.ndarray]:
    """Cluster 1-D `values` (float32), each in row `rows[i]`, into k centroids per row.

    Returns (centroids float64 [n_rows, k] ascending, index uint8/int [len(values)]):
    value i is closest (up to float32 rounding of the boundaries) to
    centroids[rows[i], index[i]]. A row with no values gets centroids 0.
    """
    values = _positive_zero(np.asarray(values, dtype=np.float32).reshape(-1))
    rows = np.asarray(rows, dtype=np.uint64).reshape(-1)
    keys = np.sort((rows << np.uint64(32)) | _ordered(values).astype(np.uint64))
    ordered = _unordered((keys & np.uint64(0xFFFFFFFF)).astype(np.uint32))
    starts = np.searchsorted(keys, np.arange(n_rows + 1, dtype=np.uint64) << np.uint64(32))
    counts = np.diff(starts)
    prefix = np.concatenate([[0.0], np.cumsum(ordered, dtype=np.float64)])
    centroids = _quantile_start(ordered, starts, counts, k)
    row_keys = np.arange(n_rows, dtype=np.uint64)[:, None] << np.uint64(32)
    previous = None
    for _ in range(MAX_ITERATIONS):
        cuts = _cut_positions(keys, row_keys, centroids, starts)
        if previous is not None and np.array_equal(cuts, previous):
            break
        previous = cuts
        sums = prefix[cuts[:, 1:]] - prefix[cuts[:, :-1]]
        sizes = cuts[:, 1:] - cuts[:, :-1]
        # An empty cluster keeps its centroid; the ordering of centroids is kept.
        centroids = np.where(sizes > 0, sums / np.maximum(sizes, 1), centroids)
    boundary_keys = (row_keys | _ordered(_boundaries(centroids)).astype(np.uint64)).reshape(-1)
    query = (rows << np.uint64(32)) | _ordered(values).astype(np.uint64)
    # Boundaries of each row sort together, so the global position minus the
    # row's first boundary is the number of the row's boundaries below the value.
    position = np.searchsorted(boundary_keys, query, side="left")
    index = position - rows.astype(np.int64) * (k - 1)
    return centroids, index


def _quantile_start(ordered: np.ndarray, starts: np.ndarray, counts: np.ndarray,
                    k: int) -> np.ndarray:
    fractions = (np.arange(k) + 0.5) / k
    offsets = np.floor(fractions[None, :] * counts[:, None]).astype(np.int64)
    picks = np.minimum(starts[:-1, None] + offsets, max(ordered.size - 1, 0))
    start = ordered[picks].astype(np.float64) if ordered.size else np.zeros((counts.size, k))
    return np.where(counts[:, None] > 0, start, 0.0)


def _boundaries(centroids: np.ndarray) -> np.ndarray:
    """float32 midpoints between neighbouring centroids, [n_rows, k - 1]."""
    return ((centroids[:, :-1] + centroids[:, 1:]) / 2).astype(np.float32)


def _cut_positions(keys: np.ndarray, row_keys: np.ndarray, centroids: np.ndarray,
                   starts: np.ndarray) -> np.ndarray:
    """Start/end positions in the sorted keys of every cluster, [n_rows, k + 1]."""
    bounds = row_keys | _ordered(_boundaries(centroids)).astype(np.uint64)
    # side="right": a value equal to a boundary joins the lower cluster, the
    # same rule the final assignment uses.
    inner = np.searchsorted(keys, bounds.reshape(-1), side="right").reshape(bounds.shape)
    return np.concatenate([starts[:-1, None], inner, starts[1:, None]], axis=1)


def _positive_zero(values: np.ndarray) -> np.ndarray:
    return values + np.float32(0.0)  # -0.0 + 0.0 is +0.0, so zeros share one key


def _ordered(values: np.ndarray) -> np.ndarray:
    """uint32 images of float32 values that sort in the same order as the values."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    negative = (bits >> np.uint32(31)).astype(bool)
    return np.where(negative, ~bits, bits | np.uint32(0x80000000))


def _unordered(images: np.ndarray) -> np.ndarray:
    """Inverse of `_ordered`."""
    positive = (images >> np.uint32(31)).astype(bool)
    bits = np.where(positive, images & np.uint32(0x7FFFFFFF), ~images)
    return bits.astype(np.uint32).view(np.float32)
