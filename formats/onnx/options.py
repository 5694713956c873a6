"""ONNX writer settings, and the choices each takes (the CLI offers exactly these).

Free of the onnx import (0.7 s), so the command line can build its options from
these definitions without loading onnx.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from modelpress.core.store import WriteOptions

EXTERNAL_DATA_MODES = ("auto", "always", "never")
"""auto: external data for inputs of 512 MiB or more or outputs over 2 GB (see `write`)."""
TARGETS = ("standard", "ort")
INT4_MODES = ("auto", "kernel", "fold")
INT8_MODES = INT4_MODES
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
"""MatMulNBits accuracy_level values (0: float math, exact; 4: int8 activations)."""


@dataclass(frozen=True)
class OnnxTarget:
    """How quantized MatMul/Gemm weights are written to ONNX.

    `target`: "standard" writes only standard ONNX operators (4-bit weights
    as a blocked DequantizeLinear that onnxruntime fuses into MatMulNBits);
    "ort" writes onnxruntime's com.microsoft.MatMulNBits directly, with
    `accuracy_level` (0 exact float math; 4 int8 activations, faster).
    `int4`: "auto" uses the 4-bit kernel for weights of at least
    `sites.KERNEL_MIN_WEIGHTS` elements, "kernel" for every eligible weight (least
    memory, fastest for single-row inputs), "fold" for none. `int8`: the same
    for weights of 5 to 8 bits and the 8-bit kernel (`sites.KERNEL8_MIN_WEIGHTS`).
    `widen`: whether 2-4-bit weights with multiplier scales are widened to
    bytes at load for the 8-bit kernel (else they take the 4-bit kernel in
    blocks of their group, as other 4-bit weights); see `sites.widen_allowed`.
    """

    target: str = "standard"
    int4: str = "auto"
    accuracy_level: int = 4
    int8: str = "auto"
    widen: bool = True   # 2-4-bit weights with multiplier scales may take the 8-bit kernel

    def __post_init__(self) -> None:
        _check("target", self.target, TARGETS)
        _check("int4", self.int4, INT4_MODES)
        _check("int8", self.int8, INT8_MODES)
        _check("accuracy_level", self.accuracy_level, ACCURACY_LEVELS)


@dataclass(frozen=True)
class OnnxWriteOptions(WriteOptions):
    """How an ONNX model is written: `external_data` (one of EXTERNAL_DATA_MODES) and
    `target`, the form of quantized MatMul/Gemm weights (see OnnxTarget)."""

    external_data: str = "auto"
    target: OnnxTarget = field(default_factory=OnnxTarget)

    def __post_init__(self) -> None:
        _check("external_data", self.external_data, EXTERNAL_DATA_MODES)


def _check(what: str, value: object, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"{what} must be one of {', '.join(map(str, choices))}, not {value!r}")


__all__ = ["ACCURACY_LEVELS", "EXTERNAL_DATA_MODES", "INT4_MODES", "INT8_MODES", "OnnxTarget",
           "OnnxWriteOptions", "TARGETS"]
