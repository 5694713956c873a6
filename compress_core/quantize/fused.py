"""Per-channel symmetric round-to-nearest quantization with its error measured in the same pass.

The general path (`quantize.quantize_array`, then `pipeline.measure_error`)
makes several whole-tensor float32 temporaries (the float copy of a bf16 or
f16 tensor, the quotients, the decoded tensor) and reads the weights three
times: for the NaN/Inf check, for quantization and for the error. On large
tensors every pass runs at memory speed, and fresh whole-tensor temporaries
cost page faults besides. Here the rows of a tensor are taken a block of
about `BLOCK_ELEMENTS` at a time; each block is read once from the mapped
file, and its range, scales, codes, finiteness and error sums are all worked
out while it is in cache, in buffers reused from block to block. Rows are
independent under per-channel scales, so codes and scales are bit for bit
those of `quantize_array`; the error sums are those of `metrics.compare`
taken over other chunks, equal to float rounding.

`quantize_measured` is the entry to the measured kernels that
`Quantize.encode_measured` gives the pipeline: this one, and
`coded.quantize_coded_measured` for any quantization with scale codes
(ONNX's defaults), which measures its blocks the same way.
"""

from __future__ import annotations

import numpy as np

from modelpress.core.dtypes import is_bfloat16, scale_dtype_for
from modelpress.core.encoded import Dense, Quantized, merged_shape
from modelpress.core.metrics import BlockSums, ErrorStats
from modelpress.core.quantize.coded import quantize_coded_measured
from modelpress.core.quantize.groups import stored_scale_up
from modelpress.core.quantize.plan import QuantPlan, chosen_layout
from modelpress.core.tensorinfo import TensorInfo, axes_for

# Elements per block: the block and one float32 work buffer (and the widened block
# of a 16-bit tensor) stay within a core's L2 cache, and numpy's per-call cost is
# spread over enough elements (measured best at 2^17 among 2^16..2^19).
BLOCK_ELEMENTS = 1 << 17

_FLOAT_TYPES = (np.dtype(np.float32), np.dtype(np.float16))


def quantize_measured(array: np.ndarray, info: TensorInfo,
                      plan: QuantPlan) -> tuple[Quantized, ErrorStats] | None:
    """The encoding and its error if `plan` is a quantization this module or
    `quantize_coded` measures as it goes: per-channel symmetric rtn with float
    scales, or any quantization with scale codes (`Quantize.encode_measured`),
    whose layout is then chosen from `array` if the plan asks (`chosen_layout`).

    Returns None when no fast path applies (another layout, a dtype other
    than float32/float16/bfloat16) or when the tensor holds NaN or Inf,
    which the general path reports; the caller then takes that path.
    """
    if not (array.dtype in _FLOAT_TYPES or is_bfloat16(array.dtype)) or array.size == 0:
        return None
    channel_axis, block_axis = axes_for(info)
    if plan.scale_bits:
        # As Quantize.apply calls quantize_coded on a dense tensor.
        w = Dense(array).decode()
        plan = chosen_layout(plan, w, info)
        if plan.block_span > 1:
            w = w.reshape(merged_shape(w.shape, block_axis, plan.block_span))
        found = quantize_coded_measured(
            w, bits=plan.bits, symmetric=plan.symmetric,
            zero_bits=plan.zero_bits, scale_bits=plan.scale_bits, granularity=plan.granularity,
            channel_axis=channel_axis, block_axis=block_axis, group_size=plan.group_size,
            method=plan.method, super_block=plan.super_block)
        if found is None or plan.block_span == 1:
            return found
        return found[0].spread(array.shape, plan.block_span), found[1]
    if (plan.granularity != "channel" or plan.method != "rtn" or not plan.symmetric
            or channel_axis != 0 or array.ndim < 2):
        return None
    return quantize_channels(array, plan.bits, scale_dtype_for(info.dtype))


def quantize_channels(array: np.ndarray, bits: int,
                      scale_dtype: np.dtype) -> tuple[Quantized, ErrorStats] | None:
    """Symmetric rtn quantization with one scale per index of axis 0, and its error.

    None if the array holds NaN or Inf (seen as a non-finite row range).
    """
    rows = array.reshape(array.shape[0], -1)
    n, cols = rows.shape
    qmax = (1 << (bits - 1)) - 1
    step = max(1, BLOCK_ELEMENTS // max(cols, 1))
    codes = np.empty((n, cols), dtype=np.int8)
    scale = np.empty(n, dtype=np.float32)
    hi, lo = np.empty(n, dtype=np.float32), np.empty(n, dtype=np.float32)
    widened = None if rows.dtype == np.float32 else np.empty((step, cols), dtype=np.float32)
    work = np.empty((step, cols), dtype=np.float32)
    sums = BlockSums()
    # NaN/Inf make the row ranges non-finite (checked at the end, when the tensor is left
    # to the general path); until then they must not warn.
    with np.errstate(all="ignore"):
        for start in range(0, n, step):
            stop = min(n, start + step)
            w = _as_float32(rows[start:stop], widened)
            s = _block_scales(w, hi[start:stop], lo[start:stop], bits, scale_dtype)
            scale[start:stop] = s[:, 0]
            q = np.divide(w, s, out=work[:stop - start])
            np.rint(q, out=q)
            # Division by s > 0 and rint keep order, so a row's extreme codes are those of
            # its extreme values: the clip is needed only if those leave the grid (never
            # with scales from max |w| rounded up; kept so codes equal quantize_array's).
            if not ((np.rint(hi[start:stop] / s[:, 0]) <= qmax).all()
                    and (np.rint(lo[start:stop] / s[:, 0]) >= -qmax - 1).all()):
                np.clip(q, -qmax - 1, qmax, out=q)
            codes[start:stop] = q
            approx = np.multiply(q, s, out=q)  # Quantized.decode's values
            sums.add(w, approx)
    if not (np.isfinite(hi).all() and np.isfinite(lo).all()):
        return None
    scale_shape = (n,) + (1,) * (array.ndim - 1)
    encoded = Quantized(codes=codes.reshape(array.shape),
                        scale=scale.reshape(scale_shape).astype(scale_dtype),
                        zero_point=None, bits=bits, granularity="channel", channel_axis=0)
    return encoded, sums.stats(int(array.size))


def _block_scales(w: np.ndarray, hi: np.ndarray, lo: np.ndarray, bits: int,
                  scale_dtype: np.dtype) -> np.ndarray:
    """Each row's stored scale (a column), as quantize_array's rtn fit; row max/min into hi/lo."""
    qmax = (1 << (bits - 1)) - 1
    np.maximum.reduce(w, axis=1, out=hi)
    np.minimum.reduce(w, axis=1, out=lo)
    amax = np.maximum(hi, -lo)  # max |w|, without a pass that writes |w|
    amax[amax <= 0] = qmax
    return stored_scale_up(amax[:, None] / qmax, scale_dtype)


def _as_float32(block: np.ndarray, buffer: np.ndarray | None) -> np.ndarray:
    """A block as float32: itself, or widened exactly into `buffer`."""
    if buffer is None:
        return block
    out = buffer[:block.shape[0]]
    if is_bfloat16(block.dtype):
        # bfloat16 is the top half of a float32: widen by a shift of the bits, several
        # times faster than ml_dtypes' element-wise cast, and exact.
        bits = out.view(np.uint32)
        np.copyto(bits, block.view(np.uint16), casting="unsafe")
        np.left_shift(bits, 16, out=bits)
    else:
        np.copyto(out, block, casting="same_kind")
    return out
