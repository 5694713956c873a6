"""Running ONNX models in onnxruntime (CPU): input feeds, sessions, timed runs.

onnxruntime is an optional dependency, imported only inside the functions that
run a model, so `modelpress --help` and `inspect` never load it.
"""

from __future__ import annotations

import math
import re
import statistics
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnx

from modelpress.core.errors import InputDataError, ModelRunError

INSTALL_HINT = "pip install 'modelpress[run]'"
DEFAULT_BATCH = 1
DEFAULT_DIM = 16
# Integer inputs that feed no Gather get this range unless --input-range says otherwise.
DEFAULT_INT_RANGE = (0, 2)
# Ops that pass integer ids through unchanged on their way to a Gather.
_PASS_THROUGH = {"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Expand"}

Feeds = dict[str, np.ndarray]


@dataclass(frozen=True)
class InputSpec:
    """One graph input: name, numpy dtype and dims (int, symbolic name, or None)."""

    name: str
    dtype: np.dtype
    dims: tuple[int | str | None, ...]


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The inputs a caller must feed (initializers listed as inputs are left out)."""
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in inits:
            continue
        tensor = value.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type))
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                     for d in tensor.shape.dim)
        specs.append(InputSpec(value.name, dtype, dims))
    return specs


def gather_ranges(model: onnx.ModelProto) -> dict[str, tuple[int, int]]:
    """Valid index range [0, rows) of each integer input that feeds a Gather's indices."""
    tables = _constant_shapes(model.graph)
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, i))
    ranges = {}
    for spec in input_specs(model):
        if spec.dtype.kind not in "iu":
            continue
        rows = _gather_rows(spec.name, consumers, tables, set())
        if rows:
            ranges[spec.name] = (0, min(rows))
    return ranges


def _gather_rows(name: str, consumers: Mapping[str, list[tuple[onnx.NodeProto, int]]],
                 tables: Mapping[str, tuple[int, ...]], seen: set[str]) -> list[int]:
    if name in seen:
        return []
    seen.add(name)
    rows = []
    for node, index in consumers.get(name, []):
        if node.op_type == "Gather" and index == 1 and node.input[0] in tables:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
            shape = tables[node.input[0]]
            rows.append(shape[axis] if shape else 0)
        elif node.op_type in _PASS_THROUGH and index == 0:
            for out in node.output:
                rows += _gather_rows(out, consumers, tables, seen)
    return [r for r in rows if r > 0]


def _constant_shapes(graph: onnx.GraphProto) -> dict[str, tuple[int, ...]]:
    shapes = {t.name: tuple(t.dims) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    shapes[node.output[0]] = tuple(attr.t.dims)
    return shapes


# Symbolic height and width of an image input: a multiple of 32 and 64, the strides at
# which detection and segmentation networks downsample and then upsample back.
DEFAULT_SPATIAL = 64
_SPATIAL_NAMES = ("height", "width")
# Short names of a batch axis besides any name containing "batch".
_BATCH_NAMES = ("n", "b", "bs")
# Recurrent ops and the input positions of their initial states ([directions, batch, hidden]).
_STATE_INPUTS = {"LSTM": (5, 6), "GRU": (5,), "RNN": (5,)}


Axis = tuple[str, int]   # (input name, axis)


def graph_dims(model: onnx.ModelProto) -> dict[Axis, int | Axis]:
    """Sizes the graph fixes for symbolic input dims: a size, or the input axis it equals.

    A graph input that is the initial state of an LSTM, GRU or RNN must be
    [num_directions, batch, hidden_size] (or [batch, num_directions,
    hidden_size] with layout=1): the node's attributes give the directions
    and the hidden size, and its batch is the batch of the sequence input X.
    """
    inputs = {spec.name for spec in input_specs(model)}
    fixed: dict[Axis, int | Axis] = {}
    for node in model.graph.node:
        for index in _STATE_INPUTS.get(node.op_type, ()):
            if index >= len(node.input) or node.input[index] not in inputs:
                continue
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            hidden = int(attrs.get("hidden_size", 0))
            direction = attrs.get("direction", b"forward")
            directions = 2 if direction in (b"bidirectional", "bidirectional") else 1
            name = node.input[index]
            batch_first = int(attrs.get("layout", 0)) == 1
            fixed[(name, 1 if batch_first else 0)] = directions
            if hidden > 0:
                fixed[(name, 2)] = hidden
            if node.input[0] in inputs:
                fixed[(name, 0 if batch_first else 1)] = (node.input[0], 0 if batch_first else 1)
    return fixed


def resolve_dims(specs: list[InputSpec], dims: Mapping[str, int],
                 fixed: Mapping[Axis, int | Axis] | None = None) -> dict[str, tuple[int, ...]]:
    """Concrete input shapes for symbolic dims, first rule that applies:

    --dim values by name; sizes the graph fixes (`graph_dims`), which also
    set every other dim of the same name; 1 for a name containing "batch"
    (or an unnamed first axis); 64 for height/width (a name containing
    them, or the last two axes of a 4-D float input); else 16.
    """
    links = {key: value for key, value in (fixed or {}).items() if isinstance(value, tuple)}
    fixed = {key: value for key, value in (fixed or {}).items() if isinstance(value, int)}
    by_name = {spec.dims[axis]: size for (name, axis), size in fixed.items()
               for spec in specs if spec.name == name and axis < len(spec.dims)
               and isinstance(spec.dims[axis], str)}
    known = {d for s in specs for d in s.dims if isinstance(d, str)}
    for name in dims:
        if name not in known:
            listed = ", ".join(sorted(known)) or "none"
            raise InputDataError(f"--dim {name}: the model has no dimension named {name!r} "
                                 f"(its symbolic dimensions: {listed})")
    shapes = {}
    for spec in specs:
        shape = []
        for axis, dim in enumerate(spec.dims):
            if isinstance(dim, int) and dim > 0:
                shape.append(dim)
            elif isinstance(dim, str) and dim in dims:
                shape.append(dims[dim])
            elif (spec.name, axis) in fixed:
                shape.append(fixed[(spec.name, axis)])
            elif isinstance(dim, str) and dim in by_name:
                shape.append(by_name[dim])
            elif (dim is None and axis == 0) or (isinstance(dim, str) and (
                    "batch" in dim.lower() or dim.lower() in _BATCH_NAMES)):
                shape.append(DEFAULT_BATCH)
            elif (isinstance(dim, str) and any(n in dim.lower() for n in _SPATIAL_NAMES)) or (
                    len(spec.dims) == 4 and axis >= 2 and spec.dtype.kind == "f"):
                shape.append(DEFAULT_SPATIAL)
            else:
                shape.append(DEFAULT_DIM)
        shapes[spec.name] = tuple(shape)
    for (name, axis), (other, other_axis) in links.items():
        dim = next(s.dims[axis] for s in specs if s.name == name)
        if name in shapes and other in shapes and not isinstance(dim, int) and dim not in dims:
            shape = list(shapes[name])
            shape[axis] = shapes[other][other_axis]
            shapes[name] = tuple(shape)
    return shapes


def made_up_hint(model: onnx.ModelProto, feeds: Feeds, dims: Mapping[str, int]) -> str:
    """How to fix a run that failed on made-up inputs: which dims were guessed, and the options."""
    guessed = []
    fixed = graph_dims(model)
    for spec in input_specs(model):
        shape = feeds[spec.name].shape if spec.name in feeds else ()
        made = [f"{d or f'dim {axis}'}={shape[axis]}" for axis, d in enumerate(spec.dims)
                if not (isinstance(d, int) and d > 0) and d not in dims and axis < len(shape)
                and (spec.name, axis) not in fixed]
        if made:
            guessed.append(f"input {spec.name!r} {list(shape)} ({', '.join(made)} made up)")
    where = "; ".join(guessed) if guessed else "the inputs were made up (random values)"
    return (f"{where}: give the real sizes with --dim NAME=N, or real inputs with "
            "--inputs FILE.npz")


def random_inputs(model: onnx.ModelProto, dims: Mapping[str, int] | None = None,
                  ranges: Mapping[str, tuple[float, float]] | None = None,
                  seed: int = 0) -> Feeds:
    """Deterministic random feeds from the input signature.

    Floats are standard normal (uniform in [low, high) when a range is given);
    integers are uniform in [low, high): the given range, else [0, rows) for
    ids that index a Gather table, else [0, 2); booleans are random.
    """
    specs = input_specs(model)
    ranges = dict(ranges or {})
    names = {s.name for s in specs}
    for name in ranges:
        if name not in names:
            raise InputDataError(f"--input-range {name}: the model has no input named {name!r} "
                                 f"(its inputs: {', '.join(sorted(names))})")
    shapes = resolve_dims(specs, dims or {}, graph_dims(model))
    gathers = gather_ranges(model)
    feeds = {}
    for spec in specs:
        rng = np.random.default_rng([seed, zlib.crc32(spec.name.encode())])
        shape, dtype = shapes[spec.name], spec.dtype
        if dtype.kind == "f":
            if spec.name in ranges:
                low, high = ranges[spec.name]
                values = rng.uniform(low, high, size=shape)
            else:
                values = rng.standard_normal(shape)
            feeds[spec.name] = values.astype(dtype)
        elif dtype.kind in "iu":
            low, high = ranges.get(spec.name) or gathers.get(spec.name) or DEFAULT_INT_RANGE
            feeds[spec.name] = rng.integers(int(low), int(high), size=shape).astype(dtype)
        elif dtype.kind == "b":
            feeds[spec.name] = rng.integers(0, 2, size=shape).astype(bool)
        else:
            # Not a bad file of the user's: the model cannot be run on made-up inputs.
            raise ModelRunError(f"input {spec.name!r} has dtype {dtype}; random inputs cover "
                                "numbers and booleans only (give --inputs FILE.npz)")
    return feeds


def load_inputs(model: onnx.ModelProto, path: Path) -> Feeds:
    """Arrays by input name from an .npz file (never unpickled), checked against the model."""
    arrays = _load_npz(path)
    specs = {s.name: s for s in input_specs(model)}
    missing = [n for n in specs if n not in arrays]
    if missing:
        raise InputDataError(f"{path}: no array for model input {missing[0]!r} (the file has "
                             f"{', '.join(sorted(arrays)) or 'none'}; the model needs "
                             f"{', '.join(specs)})")
    extra = [n for n in arrays if n not in specs]
    if extra:
        raise InputDataError(f"{path}: array {extra[0]!r} is not an input of the model "
                             f"(its inputs: {', '.join(specs)})")
    feeds = {}
    for name, spec in specs.items():
        array = arrays[name]
        if array.dtype.kind != spec.dtype.kind and not (array.dtype.kind in "iu"
                                                        and spec.dtype.kind in "iu"):
            raise InputDataError(f"{path}: array {name!r} is {array.dtype}, the model input is "
                                 f"{spec.dtype}; save it with that dtype")
        if array.ndim != len(spec.dims):
            raise InputDataError(f"{path}: array {name!r} has shape {list(array.shape)}, the "
                                 f"model input has {len(spec.dims)} dims {list(spec.dims)}")
        feeds[name] = np.ascontiguousarray(array.astype(spec.dtype, copy=False))
    return feeds


def load_labels(path: Path) -> np.ndarray:
    """Integer class labels from an .npy file (never unpickled)."""
    try:
        labels = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise InputDataError(f"{path}: no such file") from None
    except (OSError, ValueError) as exc:
        raise InputDataError(f"{path}: not a readable .npy array ({exc})") from None
    if not isinstance(labels, np.ndarray) or labels.dtype.kind not in "iuf":
        raise InputDataError(f"{path}: labels must be an integer array of class indices")
    if labels.dtype.kind == "f":
        if not np.all(np.isfinite(labels)) or not np.all(labels == np.round(labels)):
            raise InputDataError(f"{path}: labels must be whole class indices")
        labels = labels.astype(np.int64)
    return labels


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            if not hasattr(data, "files"):
                raise InputDataError(f"{path}: expected an .npz archive of arrays by input name")
            return {name: data[name] for name in data.files}
    except InputDataError:
        raise
    except FileNotFoundError:
        raise InputDataError(f"{path}: no such file") from None
    except AttributeError:  # np.load of a plain .npy returns an array without __enter__
        raise InputDataError(f"{path}: expected an .npz archive of arrays by input name") from None
    except (OSError, ValueError) as exc:
        raise InputDataError(f"{path}: not a readable .npz file ({exc})") from None


def onnxruntime_available() -> bool:
    """True when onnxruntime can be imported."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


class Session:
    """An onnxruntime CPU session with the default options, which is what users get.

    The default optimization level fuses 4-bit blocked DequantizeLinear -> MatMul
    into MatMulNBits, which quantizes activations to int8: measured output error
    includes that effect.
    """

    def __init__(self, path: Path) -> None:
        try:
            import onnxruntime as ort
        except ImportError:
            raise ModelRunError(f"onnxruntime is not installed ({INSTALL_HINT})") from None
        # Severity 4 (fatal only): onnxruntime's own error log would reach the terminal even
        # with --quiet; its errors reach the user through the exception's message instead.
        ort.set_default_logger_severity(4)
        options = ort.SessionOptions()
        options.log_severity_level = 4
        try:
            self._session = ort.InferenceSession(str(path), options,
                                                 providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ModelRunError(f"onnxruntime cannot load {path}: {_first_line(exc)}") from None
        self.path = Path(path)
        self.output_names = [o.name for o in self._session.get_outputs()]

    def run(self, feeds: Feeds) -> dict[str, np.ndarray]:
        """Every output by name."""
        try:
            values = self._session.run(None, feeds)
        except Exception as exc:
            raise ModelRunError(f"onnxruntime cannot run {self.path}: {_first_line(exc)}") from None
        return dict(zip(self.output_names, values))

    def run_raw(self, feeds: Feeds) -> None:
        """One run whose outputs are dropped (timing; the feeds already ran once)."""
        self._session.run(None, feeds)

    def time(self, feeds: Feeds, max_runs: int = 20, budget_s: float = 1.0,
             min_runs: int = 3) -> list[float]:
        """Wall times (seconds) of repeated runs after one warm-up run."""
        self.run(feeds)
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < max_runs and (len(times) < min_runs
                                         or time.perf_counter() - start < budget_s):
            t0 = time.perf_counter()
            self._session.run(None, feeds)
            times.append(time.perf_counter() - t0)
        return times


def interleaved_times(first: Session, second: Session, feeds: Feeds, max_runs: int = 20,
                      budget_s: float = 2.0, min_runs: int = 3) -> tuple[list[float], list[float]]:
    """Wall times (seconds) of both sessions, run alternately after one warm-up run each.

    Each round runs both models, in alternating order, so load from other
    processes on a shared machine falls on both alike; the runs end at
    `max_runs` each, or after `budget_s` once each has `min_runs`.
    """
    first.run(feeds)
    second.run(feeds)
    times: tuple[list[float], list[float]] = ([], [])
    sessions = (first, second)
    start = time.perf_counter()
    while len(times[0]) < max_runs and (len(times[0]) < min_runs
                                        or time.perf_counter() - start < budget_s):
        order = (0, 1) if len(times[0]) % 2 == 0 else (1, 0)
        for which in order:
            t0 = time.perf_counter()
            sessions[which].run_raw(feeds)
            times[which].append(time.perf_counter() - t0)
    return times


def quartiles_ms(times: list[float]) -> tuple[float, float]:
    """First and third quartiles of wall times, in milliseconds."""
    if len(times) < 2:
        return (1000.0 * times[0],) * 2 if times else (math.nan, math.nan)
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return 1000.0 * q1, 1000.0 * q3


def median_ms(times: list[float]) -> float:
    """Median of wall times, in milliseconds."""
    return 1000.0 * statistics.median(times)


def load_graph(path: Path) -> onnx.ModelProto:
    """The model's graph without external tensor data (enough for its signature)."""
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ModelRunError(f"{path}: not a valid ONNX model ({_first_line(exc)})") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    # onnxruntime prefixes its messages with "[ONNXRuntimeError] : 1 : FAIL : ".
    text = re.sub(r"^\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*\w+\s*:\s*", "", text)
    return text.splitlines()[0] if text else type(exc).__name__


def describe_feeds(feeds: Feeds) -> dict[str, Any]:
    """Shapes and dtypes of the feeds, JSON-safe."""
    return {name: {"shape": list(a.shape), "dtype": str(a.dtype)} for name, a in feeds.items()}


__all__ = ["Feeds", "InputSpec", "Session", "describe_feeds", "gather_ranges", "input_specs",
           "interleaved_times", "load_graph", "load_inputs", "load_labels", "made_up_hint",
           "median_ms", "quartiles_ms", "graph_dims",
           "onnxruntime_available", "random_inputs", "resolve_dims"]
