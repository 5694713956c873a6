"""Low-rank factorization: the `lowrank` stage (truncated SVD into two factors)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from modelpress.core.compose import one_of, order_error
from modelpress.core.dtypes import own_float
from modelpress.core.encoded import Dense, Encoded, LowRank, Palettized, Quantized, Scaled, Sparse
from modelpress.core.sizing import ElementSize
from modelpress.core.stage import Skip, Stage, option
from modelpress.core.svd import rank_for_energy, singular_values, truncated_svd
from modelpress.core.tensorinfo import TensorInfo

RECURRENT = ("LSTM", "GRU", "RNN")


def _first(prev: str) -> str:
    return (f"put lowrank first: lowrank -> {prev} factors the dense weight, then {prev} "
            "compresses both factors")


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
    produces = (LowRank,)
    refusals = {
        Sparse: "factors would fill in the pruned zeros; " + one_of("prune", "lowrank"),
        LowRank: "keep one lowrank stage per tensor",
        Quantized: _first("quantize"),
        Scaled: _first("cast"),
        Palettized: _first("cluster"),
    }

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
            raise order_error(self, encoded, info)
        if encoded.array.ndim != 2 and info.role in RECURRENT:
            # The op takes W and R whole: factors would be multiplied back when the model
            # loads, saving file bytes only, which quantize and cluster do without a
            # product node and a rank to choose per direction and gate.
            article = "a" if info.role == "GRU" else "an"  # an LSTM, an RNN
            raise Skip(f"it is {article} {info.role} weight [directions, gates x hidden, "
                       "inputs]; lowrank factors 2-D matrices and the op takes its weights "
                       "whole: use quantize, cast, prune or cluster")
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
        dtype = own_float(encoded.array.dtype)
        return LowRank(Dense((u * root).astype(dtype)), Dense((root[:, None] * vt).astype(dtype)))

    def estimate_size(self, size: ElementSize, info: TensorInfo) -> ElementSize | None:
        if self.energy is not None:
            return None  # the rank depends on the singular values
        return replace(size, stored=self._stored_fraction(info))

    def _stored_fraction(self, info: TensorInfo) -> float:
        """Elements of the two factors over the matrix's; 1 when the stage leaves it alone."""
        if len(info.shape) != 2:
            return 1.0
        m, n = info.shape
        rank = min(self.rank, m, n) if self.rank is not None else \
            max(1, int(round(self.rank_ratio * min(m, n))))
        return 1.0 if rank * (m + n) >= m * n else rank * (m + n) / (m * n)


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
