"""onnxruntime runs for static int8: the float graph QDQ starts from, activation ranges
of the calibration inputs, and runs of candidate QDQ models held in memory."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Mapping

import numpy as np
import onnx
import onnxruntime as ort

from modelpress.core.errors import ModelRunError
from modelpress.formats.onnx.dims import Feeds
from modelpress.formats.onnx.feeds import first_line
from modelpress.formats.onnx.qdq_sites import fold_affine

SAMPLES_PER_RUN = 8
"""Calibration samples run at once (bounds the activations held in memory)."""


def _options(threads: int = 0, level: object = None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.log_severity_level = 4
    if threads:
        options.intra_op_num_threads = threads
    if level is not None:
        options.graph_optimization_level = level
    return options


def float_graph(path: Path) -> tuple[onnx.ModelProto, int]:
    """The float model as onnxruntime's basic (hardware-independent) passes leave it:
    constants folded, Conv+BatchNorm and MatMul+Add fused; then per-channel arithmetic
    after a Conv folded into it (`qdq_sites.fold_affine`). Returns it and the nodes folded."""
    with tempfile.TemporaryDirectory(prefix="modelpress-qdq-") as tmp:
        options = _options(level=ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
        options.optimized_model_filepath = str(Path(tmp) / "basic.onnx")
        try:
            ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            model = onnx.load(options.optimized_model_filepath)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelRunError(f"onnxruntime cannot load {path}: {first_line(exc)}") from None
    return model, fold_affine(model)


class Runner:
    """A session of an in-memory model (CPU, default optimizations)."""

    def __init__(self, model: onnx.ModelProto | bytes | Path, threads: int = 0) -> None:
        data = str(model) if isinstance(model, Path) else \
            model if isinstance(model, bytes) else model.SerializeToString()
        try:
            self.session = ort.InferenceSession(data, _options(threads),
                                                providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ModelRunError(f"onnxruntime cannot load {'the QDQ model' if not isinstance(model, Path) else model}: "
                                f"{first_line(exc)}") from None
        self.names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: Feeds) -> dict[str, np.ndarray]:
        """Every output, the feeds run SAMPLES_PER_RUN samples at a time."""
        parts = [dict(zip(self.names, self.session.run(None, chunk)))
                 for chunk in chunks(feeds)]
        return {n: np.concatenate([p[n] for p in parts]) if len(parts) > 1 else parts[0][n]
                for n in self.names}


def chunks(feeds: Feeds) -> list[Feeds]:
    """The feeds in runs of SAMPLES_PER_RUN samples (whole when they share no first axis)."""
    firsts = {a.shape[0] if a.ndim else None for a in feeds.values()}
    if len(firsts) != 1 or None in firsts:
        return [dict(feeds)]
    count = firsts.pop()
    return [{k: v[i:i + SAMPLES_PER_RUN] for k, v in feeds.items()}
            for i in range(0, count, SAMPLES_PER_RUN)]


def with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of `model` that also outputs the float tensors `names`."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    present = {o.name for o in out.graph.output}
    for name in names:
        if name not in present:
            out.graph.output.append(onnx.helper.make_tensor_value_info(
                name, onnx.TensorProto.FLOAT, None))
    return out


def tensor_minmax(model: onnx.ModelProto, feeds: Feeds,
                  names: list[str]) -> Mapping[str, tuple[float, float]]:
    """The least and largest value of each of `names` over the calibration feeds."""
    runner = Runner(with_outputs(model, names))
    found: dict[str, tuple[float, float]] = {}
    for chunk in chunks(feeds):
        values = dict(zip(names, runner.session.run(names, chunk)))
        for name in names:
            v = values[name]
            lo, hi = (float(v.min()), float(v.max())) if v.size else (0.0, 0.0)
            if name in found:
                lo, hi = min(lo, found[name][0]), max(hi, found[name][1])
            found[name] = (lo, hi)
    return found
