"""Low-precision floats: the `cast` stage (fp16, bf16, fp8 with scales)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from modelpress.core.compose import apply_to_factors, one_of, order_error
from modelpress.core.dtypes import ml_dtype, scale_dtype_for, short_name
from modelpress.core.encoded import Dense, Encoded, LowRank, Palettized, Quantized, Scaled, Sparse
from modelpress.core.errors import UnsupportedTensorError
from modelpress.core.sizing import ElementSize, per_element
from modelpress.core.stage import Skip, Stage, option
from modelpress.core.tensorinfo import TensorInfo, axes_for

# --dtype -> the numpy dtype's name in ml_dtypes (None: numpy's float16), resolved by
# `cast_dtype` when a run casts, so that only bf16/fp8 runs import ml_dtypes.
CAST_DTYPES: dict[str, str | None] = {
    "fp16": None,
    "bf16": "bfloat16",
    "fp8-e4m3": "float8_e4m3fn",
    "fp8-e5m2": "float8_e5m2",
}


def cast_dtype(name: str) -> np.dtype:
    """The storage dtype of a --dtype choice (fp16, bf16, fp8-e4m3, fp8-e5m2)."""
    ml_name = CAST_DTYPES[name]
    return np.dtype(np.float16) if ml_name is None else ml_dtype(ml_name)


def largest(dtype: np.dtype) -> float:
    """The largest finite value of a float dtype."""
    dtype = np.dtype(dtype)
    if dtype.kind == "f" and dtype.isbuiltin == 1:  # numpy's own float types
        return float(np.finfo(dtype).max)
    import ml_dtypes  # lazy: 0.6 s to import; only bf16/fp8 need its finfo
    return float(ml_dtypes.finfo(dtype).max)


@dataclass(frozen=True)
class Cast(Stage):
    """Store weights as lower-precision floats: fp16, bf16, fp8-e4m3 or fp8-e5m2.

    fp8 weights are divided by a scale (one per tensor or per output channel)
    so that the largest weight lands on the format's largest value; the scale
    is stored beside them, in the model's float type.
    """

    id = "cast"
    summary = "low-precision floats (fp16, bf16, fp8 with per-tensor or per-channel scales)"
    produces = (Scaled,)
    refusals = {
        Quantized: "quantize already stores its scales in the model's float type; "
                   + one_of("quantize", "cast"),
        Scaled: "keep one cast stage per tensor",
        Palettized: "cluster keeps its codebook in the model's float type; "
                    + one_of("cluster", "cast"),
    }

    dtype: str = option("fp16", "storage type of the weights", choices=tuple(CAST_DTYPES))
    scale: str | None = option(
        None, "none: a plain cast; tensor: one scale per tensor; channel: one per output "
        "channel [default: channel for fp8, none for fp16/bf16]",
        choices=("none", "tensor", "channel"))

    def validate(self) -> None:
        fp8 = self.dtype.startswith("fp8")
        if self.scale is None:
            object.__setattr__(self, "scale", "channel" if fp8 else "none")
        elif fp8 and self.scale == "none":
            self.fail(f"--dtype {self.dtype} needs --scale tensor or channel: without a scale "
                      "weights use only a sliver of fp8's range")

    def apply(self, encoded: Encoded, info: TensorInfo) -> Encoded:
        if isinstance(encoded, Sparse) and isinstance(encoded.values, Dense):
            # Zero stays exactly zero in every float format.
            return Sparse(encoded.mask, self.apply(encoded.values, info), encoded.pattern)
        if isinstance(encoded, LowRank) and isinstance(encoded.left, Dense):
            return apply_to_factors(self, encoded, info)
        if not isinstance(encoded, Dense):
            raise order_error(self, encoded, info)
        target = cast_dtype(self.dtype)
        if encoded.array.dtype == target and self.scale == "none":
            raise Skip(f"it is already {short_name(target)}")
        channel_axis = axes_for(info)[0] if self.scale == "channel" else None
        return cast_array(encoded.decode(), target, self.scale, channel_axis,
                          scale_dtype_for(info.dtype), info.name)

    def estimate_size(self, size: ElementSize, info: TensorInfo) -> ElementSize:
        side = 0.0 if self.scale == "none" else scale_dtype_for(info.dtype).itemsize * 8 \
            * per_element(self.scale, info, None)
        return replace(size, value_bits=float(cast_dtype(self.dtype).itemsize * 8), side=side)


def cast_array(w: np.ndarray, target: np.dtype, scale: str, channel_axis: int | None,
               scale_dtype: np.dtype, name: str = "tensor") -> Scaled:
    """Cast a float32 array to `target`, with a scale per tensor or channel unless scale is none."""
    w = np.asarray(w, dtype=np.float32)
    if scale == "none":
        top = largest(target)
        amax = float(np.abs(w).max()) if w.size else 0.0
        if amax > top:
            raise UnsupportedTensorError(
                f"tensor {name!r} holds {amax:.4g}, beyond {short_name(target)}'s largest value "
                f"({top:.4g}); use --scale tensor or --scale channel")
        return Scaled(w.astype(target))
    if scale == "channel" and channel_axis is not None and w.ndim >= 2:
        axes = tuple(i for i in range(w.ndim) if i != channel_axis)
        amax = np.abs(w).max(axis=axes, keepdims=True)
    else:
        channel_axis = None
        amax = np.abs(w).max(keepdims=True) if w.size else np.ones((1,) * w.ndim, np.float32)
    top = np.float32(largest(target))
    stored = (amax / top).astype(scale_dtype).astype(np.float32)
    stored = np.where((stored > 0) & np.isfinite(stored), stored, np.float32(1.0))
    # The stored (rounded) scale may put a weight just past the top: clip, never overflow.
    values = np.clip(w / stored, -top, top).astype(target)
    return Scaled(values, stored.astype(scale_dtype), channel_axis)
