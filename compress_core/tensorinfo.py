"""What the pipeline knows about a tensor before reading it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from modelpress.core.dtypes import is_float


@dataclass(frozen=True, eq=False)
class InputStats:
    """Mean and variance of each of a layer's K inputs over the calibration data."""

    mean: np.ndarray   # float64 [K]
    var: np.ndarray    # float64 [K]
    samples: int       # input rows averaged (calibration samples x positions)


@dataclass(frozen=True)
class TensorInfo:
    """Name, shape and dtype from the file's header, plus the tensor's role.

    `channel_axis` is the output-channel axis (one scale per channel) and
    `block_axis` the reduction axis that groups run along; both come from how
    the model uses the tensor (an ONNX MatMul weight [K, N] has channel axis 1
    and block axis 0, a torch Linear weight [out, in] the reverse).
    `weight_like` marks a default target: a weight input of MatMul, Gemm,
    Conv, ConvTranspose or Gather in ONNX; any tensor of 2 or more dims in
    safetensors. Size and dtype rules are applied by the pipeline.
    `format` is the file format the tensor is read from and written to
    ("onnx", "safetensors"; None when unknown): stages pick format-specific
    defaults with it. `sensitive` says why quantization error in this tensor
    reaches the output directly: "embedding" (a lookup table of the input
    tokens) or "head" (the output layer); None otherwise. `sensitive_share`,
    where the reader knows it, is the share of the model's weight elements
    that its sensitive tensors hold together (it budgets their backup
    precision, see compress_core/quantize/plan.py). `mean_weight_size`, where
    the reader knows it, is the mean element count of the model's weight
    tensors that a default run changes (`with_mean_weight_size`): the 8-bit
    group size is priced against it (compress_core/quantize/grouping.py). `input_stats`, set by a
    calibration run (ONNX MatMul/Gemm weights, see compress_core/calibrate.py),
    holds the statistics of the inputs the weight multiplies.
    """

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype
    weight_like: bool = False
    channel_axis: int | None = None
    block_axis: int | None = None
    role: str | None = None
    format: str | None = None
    sensitive: str | None = None
    sensitive_share: float | None = None
    mean_weight_size: float | None = None
    input_stats: InputStats | None = field(default=None, compare=False, repr=False)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * np.dtype(self.dtype).itemsize

    @property
    def is_float(self) -> bool:
        return is_float(self.dtype)

    def default_target(self, min_elements: int) -> bool:
        """True when stages change this tensor without being told its name."""
        return (self.weight_like and self.is_float and len(self.shape) >= 2
                and self.size >= min_elements)


def with_mean_weight_size(tensors: dict[str, TensorInfo],
                          min_elements: int) -> dict[str, TensorInfo]:
    """The same TensorInfos, each with the mean element count of those that are default
    targets at `min_elements` (unchanged when there are none)."""
    sizes = [info.size for info in tensors.values() if info.default_target(min_elements)]
    if not sizes:
        return tensors
    mean = sum(sizes) / len(sizes)
    return {name: replace(info, mean_weight_size=mean) for name, info in tensors.items()}


def axes_for(info: TensorInfo) -> tuple[int | None, int]:
    """Channel and block axes for a tensor, with defaults for tensors of no known role."""
    ndim = len(info.shape)
    if info.block_axis is not None:
        return info.channel_axis, info.block_axis
    if ndim >= 2:
        return 0, ndim - 1
    return None, 0
