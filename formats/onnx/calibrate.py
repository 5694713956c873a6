"""Input statistics of MatMul/Gemm weights: the original model run on calibration data.

For `compress --calibration FILE.npz`: each weight used only as the B input
of MatMul or Gemm in the main graph, on inputs that are non-negative by
construction (see `nonnegative`), gets the mean and variance of each of its
K inputs (the activation feeding that node), averaged over every row the
calibration data produces (samples x positions). Non-negative inputs are
where a weight error's mean effect is large: every input pushes the same
way, so the errors of a column add up instead of cancelling (a classifier
after ReLU and global pooling, a layer on one-hot features). Elsewhere
(after LayerNorm, say) the inputs' means have mixed signs and little weight,
and the model is not run for them. The original model runs in
onnxruntime (CPU, default options) with those activations added as outputs,
a few samples at a time; external data is read from the model's folder in
place. compress_core/calibrate.py uses the statistics to choose roundings.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from modelpress.core.calibrate import InputStats
from modelpress.core.errors import InputDataError, ModelRunError

from modelpress.formats.onnx.graph import graphs
from modelpress.formats.onnx.run import INSTALL_HINT, first_line, input_specs, load_inputs

SAMPLES_PER_RUN = 8
"""Calibration samples run at once (bounds the activations held in memory)."""

# Ops whose output is never negative, whatever their input.
_NONNEGATIVE = {"Relu", "Sigmoid", "Softmax", "Abs", "Exp", "Softplus", "HardSigmoid",
                "ReduceL2", "ReduceSumSquare", "Equal", "Greater", "Less", "GreaterOrEqual",
                "LessOrEqual", "Not", "And", "Or", "Xor", "IsNaN", "IsInf", "Shape", "Size"}
# Ops that keep their first input's values (or take means, maxima or minima of them).
_KEEPS_SIGN = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Transpose", "Cast", "Identity",
               "ReduceMean", "ReduceMax", "ReduceMin", "GlobalAveragePool", "AveragePool",
               "MaxPool", "GlobalMaxPool", "Slice", "Expand", "Tile", "Gather", "Dropout",
               "DepthToSpace", "SpaceToDepth"}
_MAX_DEPTH = 16


@dataclass(frozen=True)
class LayerInput:
    """The activation that multiplies a weight: its name and whether K is its first axis
    (Gemm with transA=1) rather than its last."""

    activation: str
    k_first: bool


def nonnegative(model: onnx.ModelProto, name: str,
                producers: dict[str, onnx.NodeProto] | None = None, depth: int = 0) -> bool:
    """True when the main-graph value `name` cannot be negative: made by an op of
    _NONNEGATIVE, a Clip with a constant minimum >= 0, or from such values by ops of
    _KEEPS_SIGN or Concat. `producers`: output name -> node (built if not given)."""
    if producers is None:
        producers = {out: node for node in model.graph.node for out in node.output}
    producer = producers.get(name)
    if producer is None or depth > _MAX_DEPTH or producer.domain not in ("", "ai.onnx"):
        return False
    op = producer.op_type
    if op in _NONNEGATIVE:
        return True
    if op == "Clip":
        low = _constant(model, producers, producer.input[1]) if len(producer.input) > 1 else None
        if low is None:
            low = next((a.f for a in producer.attribute if a.name == "min"), None)
        return low is not None and bool(np.all(np.asarray(low) >= 0))
    if op in _KEEPS_SIGN:
        return bool(producer.input) and nonnegative(model, producer.input[0], producers,
                                                    depth + 1)
    if op == "Concat":
        return all(nonnegative(model, i, producers, depth + 1) for i in producer.input)
    return False


def _constant(model: onnx.ModelProto, producers: dict[str, onnx.NodeProto],
              name: str) -> np.ndarray | None:
    """A scalar initializer's or Constant's value, or None."""
    if not name:
        return None
    try:
        for tensor in model.graph.initializer:
            if tensor.name == name:
                return numpy_helper.to_array(tensor) if len(tensor.dims) == 0 else None
        node = producers.get(name)
        if node is not None and node.op_type == "Constant":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            return None if value is None else numpy_helper.to_array(value)
    except (ValueError, TypeError, KeyError):  # external or malformed: not a known minimum
        return None
    return None


def layer_inputs(model: onnx.ModelProto, names: set[str]) -> dict[str, list[LayerInput]]:
    """For each of `names` used only as the weight (B) of main-graph MatMul/Gemm nodes, the
    activations it multiplies. Weights with any other use are left out."""
    found: dict[str, list[LayerInput]] = {}
    other: set[str] = set()
    for graph in graphs(model.graph):
        for node in graph.node:
            for i, name in enumerate(node.input):
                if name not in names:
                    continue
                standard = node.domain in ("", "ai.onnx")
                if (graph is model.graph and standard and i == 1
                        and node.op_type in ("MatMul", "Gemm") and node.input[0]):
                    trans_a = node.op_type == "Gemm" and any(
                        a.name == "transA" and a.i for a in node.attribute)
                    found.setdefault(name, []).append(LayerInput(node.input[0], trans_a))
                else:
                    other.add(name)
    outputs = {o.name for o in model.graph.output}
    return {n: uses for n, uses in found.items() if n not in other and n not in outputs}


def input_stats(path: Path, graph: onnx.ModelProto, calibration: Path,
                weights: dict[str, int]) -> tuple[dict[str, InputStats], list[str]]:
    """Statistics for each weight of `weights` (name -> K) that `layer_inputs` accepts and
    that takes non-negative inputs, from running the model at `path` (whose graph is
    `graph`) on the arrays in `calibration`; and notes for the report. The model is loaded
    and run only if some weight qualifies; the calibration file is checked in any case."""
    feeds = load_inputs(graph, calibration)
    producers = {out: node for node in graph.graph.node for out in node.output}
    uses = {n: u for n, u in layer_inputs(graph, set(weights)).items()
            if all(nonnegative(graph, use.activation, producers) for use in u)}
    if not uses:
        return {}, [f"--calibration {calibration}: not used (no quantized MatMul/Gemm weight "
                    "takes non-negative inputs)"]
    try:
        import onnxruntime as ort  # heavy and optional: only for --calibration
    except ImportError:
        raise ModelRunError(f"--calibration needs onnxruntime ({INSTALL_HINT})") from None
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ModelRunError(f"{path}: not a valid ONNX model ({first_line(exc)})") from None
    activations = sorted({u.activation for use in uses.values() for u in use})
    graph_inputs = {i.name for i in model.graph.input}
    present = {o.name for o in model.graph.output}
    for name in activations:
        if name not in graph_inputs and name not in present:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                     str(Path(path).resolve().parent))
    try:
        session = ort.InferenceSession(model.SerializeToString(), options,
                                       providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelRunError(f"--calibration: onnxruntime cannot load {path}: "
                            f"{first_line(exc)}") from None
    del model
    wanted = [n for n in activations if n not in graph_inputs]
    sums: dict[str, tuple[np.ndarray, np.ndarray, int]] = {}
    for chunk in _chunks(feeds, calibration, graph):
        try:
            values = dict(zip(wanted, session.run(wanted, chunk))) if wanted else {}
        except Exception as exc:
            raise ModelRunError(f"--calibration {calibration}: onnxruntime cannot run {path}: "
                                f"{first_line(exc)}") from None
        values.update({n: chunk[n] for n in activations if n in graph_inputs})
        for name, use_list in uses.items():
            for use in use_list:
                _accumulate(sums, (name, use), values[use.activation], use.k_first,
                            weights[name])
    stats, skipped = {}, []
    for name, use_list in uses.items():
        parts = [sums.get((name, u)) for u in use_list]
        if any(p is None for p in parts):
            skipped.append(name)
            continue
        total = sum(p[0] for p in parts)
        square = sum(p[1] for p in parts)
        rows = sum(p[2] for p in parts)
        mean = total / rows
        stats[name] = InputStats(mean, square / rows - mean * mean, rows)
    notes = []
    if stats:
        rows = min(s.samples for s in stats.values())
        notes.append(f"--calibration {calibration}: input statistics for {len(stats)} "
                     f"MatMul/Gemm weights (at least {rows} input rows each)")
    if skipped:
        notes.append(f"--calibration: no usable inputs for {len(skipped)} weights (not float, "
                     f"or not K wide), e.g. {skipped[0]!r}; rounded without statistics")
    return stats, notes


def _chunks(feeds: dict[str, np.ndarray], calibration: Path, graph: onnx.ModelProto):
    """The feeds a few samples at a time along axis 0 (as many as a fixed batch dimension
    of the model's inputs says, else SAMPLES_PER_RUN), or whole when the inputs do not
    share a first axis."""
    firsts = {a.shape[0] if a.ndim else None for a in feeds.values()}
    if len(firsts) != 1 or None in firsts:
        yield feeds
        return
    count = firsts.pop()
    if count == 0:
        raise InputDataError(f"{calibration}: the arrays hold no samples")
    fixed = {s.dims[0] for s in input_specs(graph) if s.dims and isinstance(s.dims[0], int)
             and s.dims[0] > 0}
    per_run = SAMPLES_PER_RUN
    if len(fixed) == 1:
        per_run = fixed.pop()
        if count % per_run:
            raise InputDataError(f"{calibration}: the model takes batches of exactly {per_run} "
                                 f"samples; give a multiple of {per_run} (the file has {count})")
    for start in range(0, count, per_run):
        yield {k: v[start:start + per_run] for k, v in feeds.items()}


def _accumulate(sums: dict, key: tuple, value: np.ndarray, k_first: bool, k: int) -> None:
    """Add one activation's rows to the running sums (nothing if it is not a float array
    with K along the expected axis: that weight then gets no statistics)."""
    value = np.asarray(value)
    if value.dtype.kind != "f" or value.ndim < 1:
        return
    rows = value.T if (k_first and value.ndim == 2) else value
    if rows.shape[-1] != k:
        return
    rows = rows.reshape(-1, k)
    if rows.dtype != np.float32:
        rows = rows.astype(np.float32)
    total = rows.sum(axis=0, dtype=np.float64)  # pairwise sums: float32 rows, float64 totals
    square = np.einsum("ij,ij->j", rows, rows, dtype=np.float64)
    if not (np.isfinite(total).all() and np.isfinite(square).all()):
        return
    before = sums.get(key, (0.0, 0.0, 0))
    sums[key] = (before[0] + total, before[1] + square, before[2] + rows.shape[0])
