"""Low-rank factorization: the `lowrank` stage (truncated SVD into two factors)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from modelpress.core.dtypes import BFLOAT16
from modelpress.core.encoded import Dense, Encoded, LowRank
from modelpress.core.stage import Skip, Stage, option
from modelpress.core.svd import rank_for_energy, singular_values, truncated_svd
from modelpress.core.tensorinfo import TensorInfo

# The model's own float types (so ONNX consumers get the type they expect); fp8 -> fp32.
_FACTOR_DTYPES = (np.dtype(np.float16), BFLOAT16, np.dtype(np.float32), np.dtype(np.float64))


@dataclass(frozen=True)
class Factorize(Stage):
    """Low-rank factorization: a matrix W [m, n] becomes U [m, r] @ V [r, n].

    The rank comes from exactly one of --rank, --rank-ratio (of min(m, n)) or
    --energy (the smallest rank keeping that fraction of the squared singular
    values). A tensor whose factors would not be smaller than it is left as it
    is, with a note; so are tensors that are not 2-D (convolution kernels).
    Later stages (quantize, cast, cluster) compress both factors.
    """

    id = "lowrank"
    summary = "low-rank factorization by truncated SVD (skipped where it would not save bytes)"

    rank: int | None = option(None, "number of singular values kept", min=1)
    rank_ratio: float | None = option(
        None, "rank as a fraction of min(rows, cols), in (0, 1]", min=0.0, max=1.0,
        min_open=True)
    energy: float | None = option(
        None, "keep the smallest rank holding this fraction of the squared singular values, "
        "in (0, 1]", min=0.0, max=1.0, min_open=True)

    def validate(self) -> None:
        given = [name for name in ("rank", "rank_ratio", "energy") if getattr(self, name) is not None]
        if len(given) != 1:
            self.fail("give exactly one of --rank, --rank-ratio or --energy"
                      + (f" (got {', '.join('--' + g.replace('_', '-') for g in given)})"
                         if given else ""))

    def apply(self, encoded: Encoded, info: TensorInfo) -> Encoded:
        if not isinstance(encoded, Dense):
            from modelpress.core.compose import order_error
            raise order_error(self, encoded, info)
        if encoded.array.ndim != 2:
            raise Skip(f"it is {encoded.array.ndim}-D; lowrank factors 2-D matrices")
        m, n = encoded.shape
        w = encoded.array.astype(np.float64 if encoded.array.dtype == np.float64 else np.float32)
        w, unscale = _tamed(w)
        if self.energy is not None:
            rank = rank_for_energy(singular_values(w), self.energy)
        elif self.rank is not None:
            rank = min(self.rank, m, n)
        else:
            rank = max(1, int(round(self.rank_ratio * min(m, n))))
        if rank * (m + n) >= m * n:
            raise Skip(f"rank {rank} factors ({rank * (m + n):,} values) would not be smaller "
                       f"than the {m}x{n} matrix ({m * n:,} values)")
        u, s, vt = truncated_svd(w, rank)
        # Split the singular values evenly so both factors have the same range,
        # which keeps them equally easy to quantize.
        root = np.sqrt(s) * unscale
        dtype = encoded.array.dtype if encoded.array.dtype in _FACTOR_DTYPES else np.float32
        return LowRank(Dense((u * root).astype(dtype)), Dense((root[:, None] * vt).astype(dtype)))


# float32 products of values past this overflow inside the SVD (issue 15: weights near
# 3e38 gave overflow warnings, then LinAlgError).
_TAME_ABOVE = 2.0**60


def _tamed(w: np.ndarray) -> tuple[np.ndarray, float]:
    """`w` scaled by a power of four when float32 products of its values would overflow,
    and the factor by which each factor's singular-value root must grow back.

    A power of two scales exactly, and four's square root is one too, so the
    factors come out as an unscaled SVD's would; ordinary weights are left alone.
    """
    if w.dtype != np.float32 or w.size == 0:
        return w, 1.0
    peak = float(np.max(np.abs(w)))
    if not peak > _TAME_ABOVE or not np.isfinite(peak):
        return w, 1.0
    half = (int(np.ceil(np.log2(peak))) + 1) // 2  # w / 4**half has entries below 2
    return w * np.float32(0.25**half), float(2.0**half)


def factor_info(info: TensorInfo, shape: tuple[int, ...], which: str) -> TensorInfo:
    """TensorInfo for one factor of a low-rank tensor.

    Both factors keep the matrix's channel and block axes: the left factor's
    rows are the matrix's rows and the right factor's columns its columns,
    and each is used the way the matrix was (same reduction side).
    """
    return dataclasses.replace(info, name=f"{info.name}.{which}", shape=tuple(shape))


def apply_to_factors(stage: Stage, encoded: LowRank, info: TensorInfo) -> LowRank:
    """`stage` applied to each factor of a low-rank tensor, with that factor's TensorInfo."""
    return LowRank(stage.apply(encoded.left, factor_info(info, encoded.left.shape, "left")),
                   stage.apply(encoded.right, factor_info(info, encoded.right.shape, "right")))
