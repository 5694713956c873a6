"""Names and numpy dtypes of the floating-point formats modelpress reads and writes."""

from __future__ import annotations

import ml_dtypes
import numpy as np

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
FLOAT8_E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
FLOAT8_E5M2 = np.dtype(ml_dtypes.float8_e5m2)

FLOAT_DTYPES = (
    np.dtype(np.float64),
    np.dtype(np.float32),
    np.dtype(np.float16),
    BFLOAT16,
    FLOAT8_E4M3,
    FLOAT8_E5M2,
)

_SHORT = {
    np.dtype(np.float64): "fp64",
    np.dtype(np.float32): "fp32",
    np.dtype(np.float16): "fp16",
    BFLOAT16: "bf16",
    FLOAT8_E4M3: "fp8-e4m3",
    FLOAT8_E5M2: "fp8-e5m2",
}


def is_float(dtype: np.dtype) -> bool:
    """True for the floating-point dtypes stages can change."""
    return np.dtype(dtype) in FLOAT_DTYPES


def short_name(dtype: np.dtype) -> str:
    """A short display name: fp32, bf16, int64 ..."""
    dtype = np.dtype(dtype)
    return _SHORT.get(dtype, dtype.name)


def scale_dtype_for(dtype: np.dtype) -> np.dtype:
    """The dtype quantization scales are stored in for a tensor of `dtype`.

    Scales follow the model's own float type (so DequantizeLinear outputs the
    type the graph expects, and compressed-tensors readers get the dtype they
    assume); 8-bit and wider-than-32 inputs fall back to float32.
    """
    dtype = np.dtype(dtype)
    if dtype in (np.dtype(np.float16), BFLOAT16):
        return dtype
    return np.dtype(np.float32)
