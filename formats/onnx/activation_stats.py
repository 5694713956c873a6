"""Activation statistics for static int8: the original model run on calibration data.

`collect` gives a `Histogram` of each named tensor (graph inputs or node outputs of
the main graph) over every calibration sample; `collect_stats` also gives, for
SmoothQuant (`smooth`), the largest |value| of each channel (last axis) of other
named tensors. The model runs in onnxruntime with those tensors added as outputs,
a few samples at a time (`calibration_run`), and only the histograms and
per-channel maxima are kept, never the activations. A histogram widens as it
goes (see `modelpress.core.histogram`), so one pass over the data suffices.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from modelpress.core.histogram import BINS, Histogram, NonFiniteError
from modelpress.formats.onnx.calibration_run import (SAMPLES_PER_RUN, chunks, exposing_session,
                                                     run_exposed)
from modelpress.formats.onnx.run import load_inputs


@dataclass
class ActivationStats:
    """Per-tensor histograms and per-channel maxima of |x| (over the last axis)."""

    histograms: dict[str, Histogram] = field(default_factory=dict)
    absmax: dict[str, np.ndarray] = field(default_factory=dict)


def collect(path: Path, model: onnx.ModelProto, calibration: Path,
            names: list[str]) -> dict[str, Histogram]:
    """A histogram of each tensor of `names` over the calibration samples, from running the
    model at `path` (whose graph is `model`) on the arrays in `calibration`."""
    return collect_stats(path, model, calibration, names).histograms


def collect_stats(path: Path, model: onnx.ModelProto, calibration: Path, names: list[str],
                  channels: list[str] = (), bins: int = BINS,
                  per_run: int = SAMPLES_PER_RUN) -> ActivationStats:
    """Histograms of `names` and per-channel maxima of |x| of `channels`, in one pass over
    the calibration samples (`per_run` at a time unless the model fixes its batch)."""
    feeds = load_inputs(model, calibration)
    _check_names(model, [*names, *channels], path)
    graph_inputs = {i.name for i in model.graph.input}
    wanted = sorted(set(names).union(channels) - graph_inputs)
    stats = ActivationStats({n: Histogram(bins, n) for n in names})
    session = exposing_session(path, wanted) if wanted else None
    for chunk in chunks(feeds, calibration, model, per_run):
        values = dict(zip(wanted, run_exposed(session, wanted, chunk, path, calibration)
                          if wanted else []))
        values.update((n, chunk[n]) for n in graph_inputs if n in chunk)
        for name in names:
            try:
                stats.histograms[name].update(_floats(values[name], name, path))
            except NonFiniteError as exc:
                raise NonFiniteError(f"--calibration {calibration}: {exc}") from None
        for name in channels:
            value = _floats(values[name], name, path)
            if value.ndim == 0 or value.size == 0:
                raise ValueError(f"{path}: tensor {name!r} has no channel axis")
            peak = np.abs(value.reshape(-1, value.shape[-1])).max(axis=0).astype(np.float64)
            if not np.isfinite(peak).all():
                raise NonFiniteError(f"--calibration {calibration}: activation {name!r} holds "
                                     "NaN or Inf values on the calibration inputs")
            previous = stats.absmax.get(name)
            stats.absmax[name] = peak if previous is None else np.maximum(previous, peak)
    return stats


def _floats(value: np.ndarray, name: str, path: Path) -> np.ndarray:
    value = np.asarray(value)
    if value.dtype.kind != "f":
        raise ValueError(f"{path}: tensor {name!r} is {value.dtype}, not floating point; "
                         "only float activations get int8 ranges")
    return value


def _check_names(model: onnx.ModelProto, names: list[str], path: Path) -> None:
    """Every name is a graph input or a node output of the main graph."""
    known = {i.name for i in model.graph.input}
    known.update(out for node in model.graph.node for out in node.output)
    missing = [n for n in names if n not in known]
    if missing:
        raise ValueError(f"{path}: no graph input or node output named {missing[0]!r} "
                         f"({len(missing)} unknown name{'s' if len(missing) > 1 else ''})")


def matmul_inputs(model: onnx.ModelProto, ops: tuple[str, ...] = ("MatMul", "Gemm", "Conv"),
                  weights_too: bool = False) -> list[str]:
    """Float activations feeding main-graph nodes of `ops`, in graph order: every input that
    is not an initializer or a Constant's output (with `weights_too`, those as well) and not
    a bias (Gemm/Conv input 2)."""
    constants = {t.name for t in model.graph.initializer}
    constants.update(n.output[0] for n in model.graph.node if n.op_type == "Constant")
    types = _elem_types(model)
    found: dict[str, None] = {}
    for node in model.graph.node:
        if node.op_type not in ops or node.domain not in ("", "ai.onnx"):
            continue
        for name in node.input[:2]:
            if name and (weights_too or name not in constants) and types.get(name) in _FLOATS:
                found[name] = None
    return list(found)


_FLOATS = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE,
           None}  # None: not inferred (kept: collect says so if it is not a float)


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element types of the main graph's values, as far as shape inference tells."""
    bare = onnx.ModelProto()
    bare.CopyFrom(model)
    for tensor in bare.graph.initializer:  # types need no weight bytes
        tensor.ClearField("raw_data")
        tensor.ClearField("float_data")
        tensor.ClearField("external_data")
        tensor.data_location = TensorProto.DEFAULT
    try:
        inferred = onnx.shape_inference.infer_shapes(bare).graph
    except Exception:  # inference is a hint here, never a reason to fail
        inferred = bare.graph
    types = {t.name: t.data_type for t in bare.graph.initializer}
    for value in (*inferred.input, *inferred.value_info, *inferred.output):
        if value.type.tensor_type.elem_type:
            types[value.name] = value.type.tensor_type.elem_type
    return types
