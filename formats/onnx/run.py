"""Running ONNX models in onnxruntime (CPU): input feeds, sessions, timed runs.

onnxruntime is an optional dependency, imported only inside the functions that
run a model, so `modelpress --help` and `inspect` never load it.
"""

from __future__ import annotations

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


def resolve_dims(specs: list[InputSpec], dims: Mapping[str, int]) -> dict[str, tuple[int, ...]]:
    """Concrete input shapes: --dim values by name, else batch 1 and 16 for other symbols."""
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
            elif (dim is None and axis == 0) or (isinstance(dim, str) and "batch" in dim.lower()):
                shape.append(DEFAULT_BATCH)
            else:
                shape.append(DEFAULT_DIM)
        shapes[spec.name] = tuple(shape)
    return shapes


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
    shapes = resolve_dims(specs, dims or {})
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
    _check_regular(path)
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


def _check_regular(path: Path) -> None:
    """Refuse a pipe, socket or device: reading one can block forever."""
    if Path(path).exists() and not Path(path).is_file():
        raise InputDataError(f"{path}: not a regular file (a pipe, socket, device or folder); "
                             "give the file itself")


def _load_npz(path: Path) -> dict[str, np.ndarray]:
    _check_regular(path)
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
        ort.set_default_logger_severity(3)
        try:
            self._session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
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


def median_ms(times: list[float]) -> float:
    """Median of wall times, in milliseconds."""
    return 1000.0 * statistics.median(times)


def load_graph(path: Path) -> onnx.ModelProto:
    """The model's graph without external tensor data (enough for its signature)."""
    if Path(path).exists() and not Path(path).is_file():  # a FIFO would block the read
        raise ModelRunError(f"{path}: not a regular file")
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
           "load_graph", "load_inputs", "load_labels", "median_ms",
           "onnxruntime_available", "random_inputs", "resolve_dims"]
