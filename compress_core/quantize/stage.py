"""Integer quantization of weights: the `quantize` stage and its kernels."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable

import numpy as np

from modelpress.core.compose import apply_to_factors, one_of, order_error
from modelpress.core.dtypes import scale_dtype_for
from modelpress.core.encoded import (GRANULARITIES, Dense, Encoded, LowRank, Palettized, Quantized,
                                     Scaled, Sparse, merged_shape)
from modelpress.core.metrics import ErrorStats
from modelpress.core.quantize.coded import quantize_coded
from modelpress.core.quantize.fused import quantize_measured
from modelpress.core.quantize.groups import GroupView, stored_scale_up, used_layout
from modelpress.core.quantize.multiplier import applies
from modelpress.core.quantize.gptq import round_calibrated
from modelpress.core.quantize.plan import (CODED_GROUP, MAX_MULTIPLIED_BITS, QuantPlan,
                                           chosen_layout, default_method, plan_for)
from modelpress.core.scalecode import MULTIPLIER_BITS
from modelpress.core.sizing import ElementSize, per_element
from modelpress.core.stage import Stage, option
from modelpress.core.tensorinfo import TensorInfo, axes_for

# Clipping ratios --method mse tries before its least-squares refit (a few times rtn's cost).
_MSE_RATIOS = (1.0, 0.92, 0.85, 0.78)
_REFIT_STEPS = 2
# Groups are processed in row blocks of about this many elements (bounds the temporaries).
_CHUNK_ELEMENTS = 1 << 21


@dataclass(frozen=True)
class Quantize(Stage):
    """Integer quantization: w ~ (code - zero_point) * scale on a 2..8-bit grid.

    Unset options follow the output format. ONNX: asymmetric groups of 16
    with 5-bit scale codes and 2-bit zero points below 8 bits (4.44 bits per
    weight at 4 bits), and at 2-4 bits multiplier scales per 128 inputs for
    MatMul/Gemm weights of 1M+ elements (4.5 bits per weight; see
    `quantize.multiplier`); at 8 bits, symmetric groups with 8-bit scale
    codes, their size chosen per tensor by rate and distortion. safetensors:
    compressed-tensors' layout (symmetric; per channel at 8 bits, else g128).

    Groups run along the inputs each output sums over; a convolution kernel
    whose input axis is shorter than a group (depthwise, grouped, one input
    channel) is grouped along each filter's whole kernel, flattened.

    In ONNX, embeddings and the output head are kept at --backup-bits when
    --bits is lower, unless --all-layers; by default 6, lowered so that
    they add at most one bit per weight over the whole model. In
    safetensors only when --backup-bits is given.

    With `compress --calibration FILE.npz` (ONNX) the codes of MatMul, Gemm
    and Conv weights are chosen by GPTQ (--method gptq) from their inputs'
    statistics, on the grid the plain method fits (same layout and size); in
    small enough models, outputs and Gather tables are weighed by probing.

    With `--activations int8` (ONNX, --bits 8, --calibration) activations are
    int8 too: QuantizeLinear/DequantizeLinear that onnxruntime runs as integer
    kernels, weights int8 per output channel (the one form those kernels take).

    \b
    Examples:
      modelpress compress m.onnx -o m4.onnx quantize --bits 4
      modelpress compress m.onnx -o m4.onnx --calibration calib.npz quantize --bits 4
      modelpress compress m.onnx -o m8.onnx --calibration calib.npz quantize --bits 8 --activations int8
    """

    id = "quantize"
    summary = "integer quantization (2-8 bits; per tensor, channel or group)"
    produces = (Quantized,)
    refusals = {
        Quantized: "the tensor is already integer-coded; keep one quantize stage per tensor "
                   "(use --include/--exclude to give tensors different bits)",
        Scaled: "cast and quantize both choose how the weights are stored; "
                + one_of("cast", "quantize"),
        Palettized: "cluster already stores each weight as a small index; "
                    + one_of("cluster", "quantize"),
    }

    bits: int = option(8, "bits per weight (2-8)", min=2, max=8)
    scheme: str | None = option(
        None, "sym: zero point 0; asym: a zero point per scale [default: asym with scale "
        "codes below 8 bits, else sym]", choices=("sym", "asym"))
    granularity: str | None = option(
        None, "one scale per tensor, per output channel, or per group of inputs "
        "[default: group below 8 bits or when --group-size is given; at 8 bits group in "
        "ONNX, channel otherwise]", choices=GRANULARITIES)
    group_size: int | None = option(
        None, "inputs per scale with granularity group [default: 16 with scale codes of "
        "6 bits or less, 128 with float scales; at 8 bits in ONNX chosen per tensor from its "
        "weights, a power of two from 4 to 128]",
        min=2)
    method: str | None = option(
        None, "rtn: round to nearest from the min/max range; mse: search each "
        "scale's clipping range for the least squared error; gptq: choose the codes column "
        "by column with error feedback from the layer's inputs (OPTQ/GPTQ; ONNX MatMul, "
        "Gemm and Conv weights, needs --calibration; same layout and size as without it) "
        "[default: gptq where --calibration gave statistics, else mse below 8 bits, rtn at 8]",
        choices=("rtn", "mse", "gptq"))
    sequential: bool = option(True, "gptq: round MatMul/Gemm layers in the model's order, each "
                              "towards the original outputs on the inputs the rounded layers "
                              "before it give [default: on; off with a target]")
    scale_bits: int | None = option(
        None, "store each scale as a code of this many bits (4-8) on a per-tensor log grid "
        "(double quantization); 0 stores floats in the model's type [default: ONNX 5 with "
        "groups of 16 or less below 8 bits, else 8; safetensors 0]", min=0, max=8)
    zero_bits: int | None = option(
        None, "bits per stored zero point with --scheme asym (2 holds -2..1 around the grid's "
        "centre) [default: 2 with scale codes and groups of 16 or less, else --bits]",
        min=1, max=8)
    super_block: int | None = option(
        None, "store group scales as 4-bit integer multiples of one float16 scale per this "
        "many inputs (2-4 bits; 4.5 bits per weight at --bits 4), a layout onnxruntime runs "
        "in its 8-bit kernel; 0 for none [default: ONNX 128 for 2-D MatMul/Gemm weights of "
        "1M elements or more in groups of up to 64 whose inputs it tiles, unless "
        "--scale-bits is given; else none]",
        min=0)
    backup_bits: int | None = option(
        None, "bits for embeddings and the output head when --bits is lower "
        "[default: ONNX 6, lowered to add at most one bit per weight over the model; "
        "safetensors: none unless given]", min=2, max=8)
    all_layers: bool = option(
        False, "quantize embeddings and the output head at --bits too (no backup precision)")
    activations: str | None = option(
        None, "int8: static int8 for activations too (ONNX, --bits 8, needs --calibration): "
        "QuantizeLinear/DequantizeLinear that onnxruntime runs as integer kernels "
        "(QLinearConv, QLinearMatMul, QGemm); weights int8 per output channel; activations "
        "whose int8 costs most output error stay float (--target-error sets how much)",
        choices=("int8",))

    def validate(self) -> None:
        if self.group_size is not None and self.granularity in ("tensor", "channel"):
            self.fail(f"--group-size applies only to --granularity group, not {self.granularity}")
        if self.scale_bits is not None and 0 < self.scale_bits < 4:
            self.fail(f"--scale-bits must be 0 (float scales) or 4-8, got {self.scale_bits}")
        if self.zero_bits is not None:
            if self.scheme == "sym":
                self.fail("--zero-bits applies only to --scheme asym")
            if self.zero_bits > self.bits:
                self.fail(f"--zero-bits {self.zero_bits} is wider than --bits {self.bits}")
        if self.super_block:
            self._validate_super_block()
        if self.backup_bits is not None and self.all_layers:
            self.fail("--backup-bits has no effect with --all-layers; give one of them")
        if self.activations is not None and self.bits != 8:
            self.fail(f"--activations {self.activations} needs --bits 8 (integer kernels take "
                      f"int8 weights), not {self.bits}")

    def _validate_super_block(self) -> None:
        if self.bits > MAX_MULTIPLIED_BITS:
            self.fail(f"--super-block applies to --bits 2-{MAX_MULTIPLIED_BITS}, "
                      f"not {self.bits}")
        if self.granularity in ("tensor", "channel"):
            self.fail(f"--super-block applies only to --granularity group, not "
                      f"{self.granularity}")
        if self.scale_bits == 0:
            self.fail("--super-block stores scales as codes; it cannot go with --scale-bits 0")
        group = self.group_size or CODED_GROUP
        if self.super_block % group:
            self.fail(f"--super-block {self.super_block} is not a multiple of the group size "
                      f"{group}")

    def resolved_config(self, info: TensorInfo, encoded: Encoded | None = None) -> dict[str, Any]:
        """The options as applied to one tensor: its plan's bits, scheme, grid and codes,
        with the layout read from `encoded` where the values chose it."""
        plan = self.plan(info)
        config = self.get_config()
        granularity, group_size = plan.granularity, plan.group_size
        if plan.from_values and encoded is not None:
            granularity, group_size = used_layout(encoded, granularity, group_size)
        config.update(scheme="sym" if plan.symmetric else "asym", granularity=granularity,
                      group_size=group_size, method=plan.method,
                      scale_bits=plan.scale_bits, zero_bits=plan.zero_bits,
                      super_block=plan.super_block,
                      sequential=self.sequential and plan.method == "gptq",
                      backup_bits=plan.bits if plan.backup else self.backup_bits)
        return config

    def plan(self, info: TensorInfo) -> QuantPlan:
        """Every option resolved for one tensor (its format, role and shape)."""
        return plan_for(self, info)

    def apply(self, encoded: Encoded, info: TensorInfo) -> Encoded:
        return self.apply_to(encoded, info, None)

    def apply_to(self, encoded: Encoded, info: TensorInfo,
                 original: np.ndarray | None) -> Encoded:
        if self.plan(info).method == "gptq":
            rounded = round_calibrated(encoded, info, self._grid, original)
            if rounded is not None:
                return rounded
        if isinstance(encoded, Sparse):
            return Sparse(encoded.mask, self.apply(encoded.values, info), encoded.pattern)
        if isinstance(encoded, LowRank):
            return apply_to_factors(self, encoded, info)
        if not isinstance(encoded, Dense):
            raise order_error(self, encoded, info)
        plan = self.plan(info)
        if plan.method == "gptq":
            plan = replace(plan, method=default_method(plan.bits))
        return self._quantized(encoded.decode(), info, plan)

    def _grid(self, array: np.ndarray, info: TensorInfo) -> Quantized:
        """`array` on the grid gptq rounds on: the plan's, fitted as without calibration."""
        plan = self.plan(info)
        return self._quantized(array, info, replace(plan, method=default_method(plan.bits)))

    def _quantized(self, array: np.ndarray, info: TensorInfo, plan: QuantPlan) -> Quantized:
        plan = chosen_layout(plan, array, info)
        channel_axis, block_axis = axes_for(info)
        w, shape = array, tuple(array.shape)
        if plan.block_span > 1:
            w = w.reshape(merged_shape(shape, block_axis, plan.block_span))
        if plan.scale_bits:
            q = quantize_coded(
                w, bits=plan.bits, symmetric=plan.symmetric,
                zero_bits=plan.zero_bits, scale_bits=plan.scale_bits,
                granularity=plan.granularity, channel_axis=channel_axis, block_axis=block_axis,
                group_size=plan.group_size, method=plan.method, super_block=plan.super_block)
        else:
            q = quantize_array(
                w, bits=plan.bits, symmetric=plan.symmetric,
                granularity=plan.granularity, channel_axis=channel_axis,
                block_axis=block_axis, group_size=plan.group_size, method=plan.method,
                scale_dtype=scale_dtype_for(info.dtype))
        return q.spread(tuple(shape), plan.block_span) if plan.block_span > 1 else q

    def encode_measured(self, array: np.ndarray,
                        info: TensorInfo) -> tuple[Quantized, ErrorStats] | None:
        plan = self.plan(info)
        return None if plan.method == "gptq" else quantize_measured(array, info, plan)

    def estimate_size(self, size: ElementSize, info: TensorInfo) -> ElementSize:
        plan = self.plan(info)
        side = _scale_bits(plan, info) * per_element(plan.granularity, info, plan.group_size)
        return replace(size, value_bits=float(plan.bits), side=side,
                       from_values=size.from_values or plan.from_values)


def gptq_refusal(stages: Iterable[Stage], *, calibration: bool, onnx: bool,
                 batch: bool = False) -> str | None:
    """Why `quantize --method gptq` among `stages` cannot run this way, or None."""
    if not any(isinstance(s, Quantize) and s.method == "gptq" for s in stages):
        return None
    if batch:
        return ("quantize --method gptq runs each model on --calibration inputs, one model at "
                "a time; batch mode does not run models (use --method mse)")
    if not onnx:
        return ("quantize --method gptq needs an ONNX model: it runs the model on --calibration "
                "inputs, and safetensors weights have no graph to run (use --method mse)")
    if not calibration:
        return ("quantize --method gptq needs --calibration FILE.npz (model inputs, like "
                "--inputs, that the original model runs on to collect each layer's input "
                "statistics); without them use --method mse")
    return None


def _scale_bits(plan: QuantPlan, info: TensorInfo) -> float:
    """Bits of one scale (and its zero point) of a quantized tensor (codes are bit-packed)."""
    bits = plan.scale_bits or scale_dtype_for(info.dtype).itemsize * 8
    block_axis = axes_for(info)[1]
    if plan.super_block and applies(merged_shape(info.shape, block_axis, plan.block_span),
                                    block_axis, plan.group_size, plan.super_block):
        # A 4-bit multiplier per group, a float16 base per super-block.
        bits = MULTIPLIER_BITS + 16 * plan.group_size / plan.super_block
    if not plan.symmetric:
        bits += plan.zero_bits or plan.bits
    return float(bits)


def quantize_array(w: np.ndarray, *, bits: int, symmetric: bool, granularity: str,
                   channel_axis: int | None, block_axis: int, group_size: int | None,
                   method: str, scale_dtype: np.dtype) -> Quantized:
    """Quantize a float array; codes are computed against the stored scales (rounded up to
    the scale dtype, so the grid still spans the values: |error| <= scale / 2 for rtn)."""
    w = np.asarray(w, dtype=np.float32)
    if (granularity == "channel" and channel_axis is None) or w.ndim == 0:
        granularity = "tensor"  # a scalar has no channels or groups
    view = GroupView(w.shape, granularity, channel_axis, block_axis, group_size)
    rows = view.rows(w)
    scale = np.empty(rows.shape[0], dtype=np.float32)
    zero = None if symmetric else np.empty(rows.shape[0], dtype=np.int8)
    codes = np.empty(rows.shape, dtype=np.int8)
    step = max(1, _CHUNK_ELEMENTS // max(rows.shape[1], 1))
    for start in range(0, rows.shape[0], step):
        block = rows[start:start + step]
        # Weights near float32's limit overflow squared errors to inf: a valid "worst"
        # candidate, not a warning for the user.
        with np.errstate(over="ignore", invalid="ignore"):
            s, z = _fit(block, bits, symmetric, method, scale_dtype)
        s = stored_scale_up(s, scale_dtype)
        if z is not None:
            zero[start:start + step] = z[:, 0]
        codes[start:start + step] = _codes(block, s, z, bits)
        scale[start:start + step] = s[:, 0]
    return Quantized(
        codes=view.restore(codes),
        scale=view.per_group(scale).astype(scale_dtype),
        zero_point=None if zero is None else view.per_group(zero),
        bits=bits, granularity=granularity,
        channel_axis=channel_axis if granularity == "channel" else None,
        block_axis=block_axis if granularity == "group" else None,
        group_size=group_size if granularity == "group" else None)


def _qrange(bits: int) -> tuple[int, int]:
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def _codes(rows: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, bits: int) -> np.ndarray:
    return _grid(rows, scale, zero, bits).astype(np.int8)


def _grid(rows: np.ndarray, scale: np.ndarray, zero: np.ndarray | None, bits: int) -> np.ndarray:
    """The codes as floats (exact small integers): the mse search stays in float32."""
    qmin, qmax = _qrange(bits)
    q = rows / scale
    np.rint(q, out=q)
    if zero is not None:
        q += zero
    return np.clip(q, qmin, qmax, out=q)


def _fit(rows: np.ndarray, bits: int, symmetric: bool, method: str,
         scale_dtype: np.dtype) -> tuple[np.ndarray, np.ndarray | None]:
    """Scales (and for asym a provisional zero point) per row."""
    if symmetric:
        return _fit_symmetric(rows, bits, method), None
    return _fit_asymmetric(rows, bits, method, scale_dtype)


def _sq_error(rows: np.ndarray, scale: np.ndarray, zero: np.ndarray | None,
              bits: int) -> np.ndarray:
    # In place on one temporary: this runs several times per block in --method mse.
    q = _grid(rows, scale, zero, bits)
    if zero is not None:
        q -= zero
    q *= scale
    q -= rows
    return np.square(q, out=q).sum(axis=1, keepdims=True)


def _search(rows: np.ndarray, candidates: Callable[[float], tuple[np.ndarray, np.ndarray | None]],
            bits: int) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """Pick, per row, the candidate (scale, zero) with the least squared error (and that error)."""
    best_s, best_z = candidates(_MSE_RATIOS[0])
    best_err = _sq_error(rows, best_s, best_z, bits)
    for ratio in _MSE_RATIOS[1:]:
        s, z = candidates(ratio)
        err = _sq_error(rows, s, z, bits)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_s = np.where(better, s, best_s)
        if z is not None:
            best_z = np.where(better, z, best_z)
    return best_s, best_z, best_err


def _fit_symmetric(rows: np.ndarray, bits: int, method: str) -> np.ndarray:
    _, qmax = _qrange(bits)
    amax = np.abs(rows).max(axis=1, keepdims=True)
    amax = np.where(amax > 0, amax, np.float32(qmax))
    if method == "rtn":
        return amax / qmax
    scale, _, err = _search(rows, lambda r: (amax * np.float32(r / qmax), None), bits)
    for _ in range(_REFIT_STEPS):
        # Least-squares refit of the scale for the current codes.
        q = _grid(rows, scale, None, bits)
        den = np.square(q).sum(axis=1, keepdims=True)
        refit = np.where(den > 0, (q * rows).sum(axis=1, keepdims=True) / np.maximum(den, 1e-30),
                         scale)
        refit = np.where(refit > 0, refit, scale)
        new_err = _sq_error(rows, refit, None, bits)
        better = new_err < err
        scale = np.where(better, refit, scale)
        err = np.where(better, new_err, err)
    return scale


def _fit_asymmetric(rows: np.ndarray, bits: int, method: str,
                    scale_dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    qmin, qmax = _qrange(bits)
    lo = np.minimum(rows.min(axis=1, keepdims=True), 0)
    hi = np.maximum(rows.max(axis=1, keepdims=True), 0)

    def candidate(ratio: float) -> tuple[np.ndarray, np.ndarray]:
        span = (hi - lo) * np.float32(ratio)
        # The zero point is fitted to the scale as stored, rounded up so the grid still
        # spans [lo, hi]: a bf16 scale rounded down would leave up to half a step uncovered.
        scale = stored_scale_up(np.where(span > 0, span / (qmax - qmin), np.float32(1.0)),
                                scale_dtype)
        zero = np.clip(np.rint(qmin - lo * np.float32(ratio) / scale), qmin, qmax)
        return scale, zero

    if method == "rtn":
        return candidate(1.0)
    return _search(rows, candidate, bits)[:2]
