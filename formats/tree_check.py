"""Consistency checks for encoded trees read back from a file (which may be damaged).

A tree rebuilt from a file's metadata must decode without surprises: scales
shaped for their granularity, masks shaped like their values. A failed check
raises ValueError, which the stores turn into a one-line ModelReadError.
"""

from __future__ import annotations

import numpy as np

from modelpress.core.encoded import GRANULARITIES, Dense, Encoded, Quantized, Sparse, scale_shape
from modelpress.core.scalecode import MultiplierCode, base_shape, max_multiplier


def check_tree(encoded: Encoded, shape: tuple[int, ...]) -> None:
    """Raise ValueError unless `encoded` is a well-formed tree of the dense `shape`."""
    if tuple(encoded.shape) != tuple(shape):
        raise ValueError(f"decodes to shape {list(encoded.shape)}, expected {list(shape)}")
    if isinstance(encoded, Dense):
        return
    if isinstance(encoded, Sparse):
        if np.asarray(encoded.mask).dtype != np.bool_:
            raise ValueError("sparse mask is not boolean")
        check_tree(encoded.values, shape)
        return
    if isinstance(encoded, Quantized):
        _check_quantized(encoded, shape)
        return
    encoded.decode()  # a node type without a dedicated check: decoding is the check


def _check_quantized(q: Quantized, shape: tuple[int, ...]) -> None:
    if not isinstance(q.bits, int) or isinstance(q.bits, bool) or not 1 <= q.bits <= 8:
        raise ValueError(f"unsupported bit width {q.bits!r}")
    if q.granularity not in GRANULARITIES:
        raise ValueError(f"unknown granularity {q.granularity!r}")
    if np.asarray(q.codes).dtype != np.int8:
        raise ValueError("codes are not int8")
    expected = _scale_shape(q, shape)
    if tuple(np.shape(q.scale)) != expected:
        raise ValueError(f"scale has shape {list(np.shape(q.scale))}, expected {list(expected)}")
    if q.zero_point is not None and tuple(np.shape(q.zero_point)) != expected:
        raise ValueError(f"zero point has shape {list(np.shape(q.zero_point))}, "
                         f"expected {list(expected)}")
    if q.zero_point is not None and q.zero_bits is not None:
        half = 1 << (q.zero_bits - 1)
        if q.zero_point.size and (q.zero_point.min() < -half or q.zero_point.max() >= half):
            raise ValueError(f"zero points do not fit {q.zero_bits} bits")
    code = q.scale_code
    if isinstance(code, MultiplierCode):
        _check_multipliers(q, code, expected)
    elif code is not None:
        if tuple(np.shape(code.codes)) != expected:
            raise ValueError(f"scale codes have shape {list(np.shape(code.codes))}, "
                             f"expected {list(expected)}")
        low_bits = code.bits // 2
        if (np.shape(code.high) != (1 << (code.bits - low_bits),)
                or np.shape(code.low) != (1 << low_bits,)):
            raise ValueError(f"scale tables do not fit {code.bits}-bit codes")


def _check_multipliers(q: Quantized, code: MultiplierCode,
                       expected: tuple[int, ...]) -> None:
    if q.granularity != "group" or code.axis != q.block_axis or code.ratio < 1:
        raise ValueError("multiplier scales need groups along their axis")
    if tuple(np.shape(code.multipliers)) != expected:
        raise ValueError(f"scale multipliers have shape {list(np.shape(code.multipliers))}, "
                         f"expected {list(expected)}")
    bases = base_shape(expected, code.axis, code.ratio)
    if tuple(np.shape(code.base)) != bases:
        raise ValueError(f"scale bases have shape {list(np.shape(code.base))}, "
                         f"expected {list(bases)}")
    if np.asarray(code.base).dtype != np.float16:
        raise ValueError("scale bases are not float16")
    limit = max_multiplier(q.bits, q.stored_zero_bits or None)
    if code.multipliers.size and (code.multipliers.min() < 1 or code.multipliers.max() > limit):
        raise ValueError(f"scale multipliers are not in 1..{limit}")


def _axis(value: object, rank: int, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < rank:
        raise ValueError(f"{what} {value!r} is not an axis of a rank-{rank} tensor")
    return value


def _scale_shape(q: Quantized, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The scale shape a well-formed tree of this granularity has (see Quantized)."""
    rank = len(shape)
    if q.granularity == "tensor":
        return (1,) * rank
    if q.granularity == "channel":
        axis = _axis(q.channel_axis, rank, "channel axis")
        return tuple(d if i == axis else 1 for i, d in enumerate(shape))
    axis = _axis(q.block_axis, rank, "block axis")
    size, span = q.group_size, q.block_span
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"group size {size!r} is not a positive integer")
    if not isinstance(span, int) or isinstance(span, bool) or not 1 <= span <= rank - axis:
        raise ValueError(f"block span {span!r} does not fit a block axis {axis} of a "
                         f"rank-{rank} tensor")
    return scale_shape(tuple(shape), "group", None, axis, size, span)
