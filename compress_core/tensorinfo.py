"""What the pipeline knows about a tensor before reading it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np

from modelpress.core.dtypes import is_float


class SecondMoments:
    """H = X^T X / rows of a layer's input rows X (float32), read when needed.

    `shape` is [K, K] for a MatMul/Gemm weight, [groups, K, K] for a Conv
    weight (one matrix per group of the convolution; K = input channels per
    group x kernel elements, in the order of the weight's flattened kernel
    [C/group, *kernel]: the im2col view of the input), its off-diagonal
    entries shrunk by their estimated noise where the rows were few (see
    modelpress.formats.onnx.moments.shrunk_moments). `load()` may run the
    model (modelpress.formats.onnx.calibrate collects these a few layers at a
    time, so that not every layer's matrix is in memory at once).
    """

    def __init__(self, shape: tuple[int, ...], load: Callable[[], np.ndarray],
                 release: Callable[[], None] | None = None) -> None:
        self.shape = tuple(shape)
        self._load = load
        self._release = release

    @classmethod
    def of(cls, array: np.ndarray) -> SecondMoments:
        """Matrices already in memory."""
        array = np.asarray(array, np.float32)
        return cls(array.shape, lambda: array)

    @classmethod
    def once(cls, array: np.ndarray) -> SecondMoments:
        """Matrices in memory until loaded once (then dropped; a second load is an error)."""
        held = [np.asarray(array, np.float32)]

        def take() -> np.ndarray:
            if not held:
                raise RuntimeError("these second moments were collected for one use")
            return held.pop()
        return cls(held[0].shape, take, held.clear)

    def load(self) -> np.ndarray:
        """The matrices, float32 of `shape`."""
        return self._load()

    def release(self) -> None:
        """Say that they will not be loaded (what holds them may drop them)."""
        if self._release is not None:
            self._release()


@dataclass(frozen=True, eq=False)
class InputStats:
    """Statistics of a layer's inputs over the calibration data.

    `mean` and `var` hold each input's mean and variance: shape [K] for a
    MatMul/Gemm weight (the activation's last axis), [groups, K] for a Conv
    weight (each column of the im2col view, padding included). An input's
    energy E[x^2] is `var + mean**2`. `second_moments`, when collected, is
    H = X^T X / rows for `quantize --method gptq` (None: too large for the
    limits of modelpress.formats.onnx.calibrate, or not collected). For a Gather
    table (a lookup has no inputs to mix) the "inputs" are the hidden width: mean 0,
    var and H from the probed metric of a row's error (modelpress.formats.onnx.probe).
    `shift`, set by sequential calibration (modelpress.formats.onnx.sequential), says
    that the layer's inputs are taken as the model with the layers before it rounded
    gives them (X~, on the same rows as the original's X): `second_moments` is then
    X~^T X~ / rows and `shift` is X~^T (X - X~) / rows, of the same shape.
    """

    mean: np.ndarray   # float64 [K] or [groups, K]
    var: np.ndarray    # float64, as mean
    samples: int       # input rows averaged (calibration samples x positions)
    second_moments: SecondMoments | None = None
    # G over the layer's outputs (modelpress.formats.onnx.probe): how the model's outputs
    # weigh an error in each output channel, and between them; None where not probed.
    output_moments: SecondMoments | None = None
    shift: SecondMoments | None = None


@dataclass(frozen=True)
class TensorInfo:
    """Name, shape and dtype from the file's header, plus the tensor's role.

    `channel_axis` is the output-channel axis (one scale per channel) and
    `block_axis` the reduction axis that groups run along; both come from how
    the model uses the tensor (an ONNX MatMul weight [K, N] has channel axis 1
    and block axis 0, a torch Linear weight [out, in] the reverse).
    `block_span` is how many axes from the block axis on one output channel's
    reduction runs over: 3 for a Conv kernel [M, C/g, kh, kw], whose
    C/g * kh * kw inputs groups may run along flattened when C/g is short
    (depthwise and grouped convolutions); 1 otherwise.
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
    group size is priced against it (compress_core/quantize/grouping.py).
    `input_stats`, set by a calibration run (ONNX MatMul/Gemm/Conv weights, see
    modelpress.formats.onnx.calibrate), holds the statistics of the inputs the
    weight multiplies. `use`, for a tensor that is not weight-like, says where
    the model reads it and why it is not taken for a weight (the note on large
    tensors left alone).
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
    block_span: int = 1
    use: str | None = None

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
