"""Static int8 (`quantize --activations int8`): when a recipe asks for it and what it refuses.

Weights and activations both become int8 so that onnxruntime runs integer
kernels; the graph work is modelpress.formats.onnx.qdq. This module holds only
what the command line checks before any model is read.
"""

from __future__ import annotations

from typing import Iterable

from modelpress.core.quantize.stage import Quantize
from modelpress.core.report import Report
from modelpress.core.stage import Stage

DEFAULT_ERROR = 0.02
"""Worst relative output error (on the calibration inputs) that static int8 keeps within
when --target-error is not given: activations are put back to float until it holds."""

# Options of quantize that choose a weight layout; static int8 uses its own (see `FUSABLE`).
_LAYOUT_OPTIONS = ("scheme", "granularity", "group_size", "method", "scale_bits", "zero_bits",
                   "super_block", "backup_bits")
FUSABLE = ("int8 weights, symmetric, one float scale per output channel: the form "
           "QLinearConv/QLinearMatMul/QGemm take (modelpress's grouped and coded int8 forms "
           "cannot be fused into them)")


def static_stage(stages: Iterable[Stage]) -> Quantize | None:
    """The quantize stage asking for int8 activations, if any."""
    return next((s for s in stages if isinstance(s, Quantize) and s.activations), None)


def static_refusal(stages: Iterable[Stage], *, calibration: bool, onnx: bool,
                   batch: bool = False, target_size: bool = False) -> str | None:
    """Why `quantize --activations int8` among `stages` cannot run this way, or None."""
    stages = list(stages)
    stage = static_stage(stages)
    if stage is None:
        return None
    if batch:
        return ("quantize --activations int8 calibrates each model on --calibration inputs, one "
                "model at a time; batch mode does not run models (compress each model alone)")
    if not onnx:
        return ("quantize --activations int8 needs an ONNX model: integer kernels run in "
                "onnxruntime, and safetensors weights have no graph (drop --activations)")
    if not calibration:
        return ("quantize --activations int8 needs --calibration FILE.npz (model inputs, like "
                "--inputs, whose activation ranges set each int8 scale)")
    if len(stages) != 1:
        return ("quantize --activations int8 is the whole recipe: give it alone (other stages "
                "change weights the integer kernels must take as int8)")
    if target_size:
        return ("--target-size does not apply to quantize --activations int8 (its size is "
                "fixed: int8 weights); use --target-error")
    return None


def layout_notes(stage: Quantize) -> list[str]:
    """Notes for weight-layout options that static int8 replaces by its fusable form."""
    given = [f"--{k.replace('_', '-')}" for k in _LAYOUT_OPTIONS if getattr(stage, k) not in
             (None, False)]
    if not given:
        return [f"static int8: {FUSABLE}"]
    return [f"static int8: {', '.join(given)} ignored; weights are {FUSABLE}"]


def latency_notes(report: Report) -> list[str]:
    """When a static int8 model ran slower than its input: what runs in float and why."""
    static = report.static_int8
    evaluation = report.evaluation
    latency = None if evaluation is None else evaluation.latency
    if not static or latency is None or not latency.after_ms > latency.before_ms:
        return []
    kernels = static["kernels"]
    named = "; ".join(f"{n}: {r}" for n, r in list(kernels["float_reasons"].items())[:6])
    conversions = ", ".join(f"{k} {v}" for k, v in kernels["conversions"].items()) or "none"
    why = ("; every product runs as an integer kernel, which this CPU runs no faster than "
           "float32 at these sizes" if not kernels["float_count"] else "")
    return [f"static int8 ran {latency.after_ms / latency.before_ms:.2f}x the input's latency: "
            f"{kernels['integer_count']} integer kernels, {kernels['float_count']} float "
            f"products ({named or 'none'}); Q/DQ conversions left: {conversions}{why}"]
