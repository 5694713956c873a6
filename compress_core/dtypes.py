"""Names and numpy dtypes of the floating-point formats modelpress reads and writes.

bf16 and fp8 are ml_dtypes' numpy dtypes. ml_dtypes takes 0.6 s to import and
only runs that hold such data need it, so it is imported on first use:
`BFLOAT16`, `FLOAT8_E4M3` and `FLOAT8_E5M2` are resolved when first read
(`dtypes.BFLOAT16`, or `from modelpress.core.dtypes import BFLOAT16`, which
reads it), and the checks below recognise these dtypes by name without it: an
array or header that holds one was made by ml_dtypes, which is then loaded.
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np

# numpy's own float dtypes, and ml_dtypes' by their dtype names.
_NUMPY_FLOATS = (np.dtype(np.float64), np.dtype(np.float32), np.dtype(np.float16))
_ML_FLOATS = {"bfloat16": "bf16", "float8_e4m3fn": "fp8-e4m3", "float8_e5m2": "fp8-e5m2"}
_LAZY = {"BFLOAT16": "bfloat16", "FLOAT8_E4M3": "float8_e4m3fn", "FLOAT8_E5M2": "float8_e5m2"}

_SHORT = {np.dtype(np.float64): "fp64", np.dtype(np.float32): "fp32", np.dtype(np.float16): "fp16"}


def __getattr__(name: str) -> Any:
    """BFLOAT16, FLOAT8_E4M3 and FLOAT8_E5M2, importing ml_dtypes on first use (PEP 562)."""
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    dtype = ml_dtype(_LAZY[name])
    globals()[name] = dtype
    return dtype


def ml_dtype(name: str) -> np.dtype:
    """The ml_dtypes dtype of that name (bfloat16, float8_e4m3fn, float8_e5m2)."""
    # Lazy: ml_dtypes takes 0.6 s to import; only bf16/fp8 data needs it.
    return np.dtype(getattr(importlib.import_module("ml_dtypes"), name))


def is_bfloat16(dtype: np.dtype) -> bool:
    """True for ml_dtypes' bfloat16 (checked without importing ml_dtypes)."""
    return np.dtype(dtype).name == "bfloat16"


def _is_ml_float(dtype: np.dtype) -> bool:
    return dtype.name in _ML_FLOATS and dtype.kind in "fV"


def is_float(dtype: np.dtype) -> bool:
    """True for the floating-point dtypes stages can change."""
    dtype = np.dtype(dtype)
    return dtype in _NUMPY_FLOATS or _is_ml_float(dtype)


def short_name(dtype: np.dtype) -> str:
    """A short display name: fp32, bf16, int64 ..."""
    dtype = np.dtype(dtype)
    if _is_ml_float(dtype):
        return _ML_FLOATS[dtype.name]
    return _SHORT.get(dtype, dtype.name)


def own_float(dtype: np.dtype) -> np.dtype:
    """`dtype` if it is fp16, bf16, fp32 or fp64, else float32 (fp8 and others).

    Codebooks and low-rank factors keep the model's own float type, so ONNX
    consumers get the type they expect; fp8 is too coarse for them.
    """
    dtype = np.dtype(dtype)
    if dtype in _NUMPY_FLOATS or is_bfloat16(dtype):
        return dtype
    return np.dtype(np.float32)


def scale_dtype_for(dtype: np.dtype) -> np.dtype:
    """The dtype quantization scales are stored in for a tensor of `dtype`.

    Scales follow the model's own float type (so DequantizeLinear outputs the
    type the graph expects, and compressed-tensors readers get the dtype they
    assume); 8-bit and wider-than-32 inputs fall back to float32.
    """
    dtype = np.dtype(dtype)
    if dtype == np.dtype(np.float16) or is_bfloat16(dtype):
        return dtype
    return np.dtype(np.float32)
