"""Running ONNX models in onnxruntime (CPU): input feeds, sessions, timed runs.

onnxruntime is an optional dependency, imported only inside the functions that
run a model, so `modelpress --help` and `inspect` never load it.
"""

from __future__ import annotations

import math
import re
import statistics
import time
import zipfile
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

# Evaluation inputs (all arrays, in memory) larger than this are refused unless the
# caller raises it (--max-input-size): both models run on them, and their
# activations are a multiple of them.
MAX_INPUT_BYTES = 64 << 20
# Inputs larger than this run in slices of samples (along the first axis they all share),
# so a model's activations stay bounded however many samples there are.
CHUNK_BYTES = 4 << 20

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
                  seed: int = 0, max_bytes: int = MAX_INPUT_BYTES) -> Feeds:
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
    total = sum(math.prod(shapes[s.name]) * s.dtype.itemsize for s in specs)
    if total > max_bytes:
        raise InputDataError(f"random inputs of shapes {_listed(shapes)} take {_mb(total)}, "
                             f"over the {_mb(max_bytes)} limit for evaluation inputs; give "
                             "smaller --dim values or raise --max-input-size")
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


def load_inputs(model: onnx.ModelProto, path: Path, max_bytes: int = MAX_INPUT_BYTES) -> Feeds:
    """Arrays by input name from an .npz file (never unpickled), checked against the model."""
    arrays = _load_npz(path, max_bytes)
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
        if array.size == 0:  # nothing to compare: every statistic would be NaN
            raise InputDataError(f"{path}: array {name!r} has shape {list(array.shape)}, no "
                                 "samples; give at least one")
        feeds[name] = np.ascontiguousarray(array.astype(spec.dtype, copy=False))
    return feeds


def load_labels(path: Path, max_bytes: int = MAX_INPUT_BYTES) -> np.ndarray:
    """Integer class labels from an .npy file (never unpickled)."""
    _check_regular(path)
    _check_npy_size(path, max_bytes)
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


def _load_npz(path: Path, max_bytes: int = MAX_INPUT_BYTES) -> dict[str, np.ndarray]:
    _check_regular(path)
    if Path(path).is_file():
        if not zipfile.is_zipfile(path):  # empty, a plain .npy, or anything else
            raise InputDataError(f"{path}: expected an .npz archive of arrays by input name "
                                 "(numpy.savez)")
        _check_npz_sizes(path, max_bytes)
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


def _check_npz_sizes(path: Path, max_bytes: int) -> None:
    """Refuse an archive whose arrays, as their headers claim, exceed `max_bytes` in memory
    (checked before any is loaded: a few compressed bytes can claim terabytes)."""
    total = 0
    try:
        with zipfile.ZipFile(path) as archive:
            for member in archive.infolist():
                with archive.open(member) as fh:
                    total += _npy_nbytes(fh)
    except InputDataError:
        raise
    except Exception as exc:  # zipfile.BadZipFile, a bad .npy header, ...
        raise InputDataError(f"{path}: not a readable .npz file ({_first_line(exc)})") from None
    if total > max_bytes:
        raise InputDataError(f"{path}: its arrays take {_mb(total)} in memory, over the "
                             f"{_mb(max_bytes)} limit for evaluation inputs; use fewer samples "
                             "or raise --max-input-size")


def _check_npy_size(path: Path, max_bytes: int) -> None:
    """Refuse an .npy file whose header claims more than `max_bytes`, or more than it holds."""
    if not Path(path).is_file():
        return
    try:
        with open(path, "rb") as fh:
            nbytes = _npy_nbytes(fh)
            held = Path(path).stat().st_size - fh.tell()
    except Exception as exc:
        raise InputDataError(f"{path}: not a readable .npy array ({_first_line(exc)})") from None
    if nbytes > max_bytes:
        raise InputDataError(f"{path}: its array takes {_mb(nbytes)} in memory, over the "
                             f"{_mb(max_bytes)} limit for evaluation inputs; raise "
                             "--max-input-size")
    if nbytes > held:
        raise InputDataError(f"{path}: not a readable .npy array (its header claims {nbytes} "
                             f"bytes, the file holds {held})")


def _npy_nbytes(fh: Any) -> int:
    """Bytes of the array an .npy stream holds, from its header alone."""
    version = np.lib.format.read_magic(fh)
    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
        np.lib.format.read_array_header_2_0
    shape, _, dtype = read(fh)
    return math.prod(shape) * dtype.itemsize


def _mb(nbytes: int) -> str:
    return f"{nbytes / 2**20:,.0f} MiB" if nbytes >= 2**20 else f"{nbytes:,} bytes"


def _listed(shapes: Mapping[str, tuple[int, ...]]) -> str:
    return ", ".join(f"{name} {list(shape)}" for name, shape in shapes.items())


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
        """Every output by name; large inputs run in slices of samples (see CHUNK_BYTES)."""
        slices = _sample_slices(feeds)
        if slices is not None:
            parts = [self._run({name: array[s] for name, array in feeds.items()})
                     for s in slices]
            counts = [s.stop - s.start for s in slices]
            if all(v.ndim and v.shape[0] == n for part, n in zip(parts, counts)
                   for v in part.values()):
                return {name: np.concatenate([part[name] for part in parts])
                        for name in self.output_names}
            # Some output does not follow the samples (e.g. a reduction): run whole.
        return self._run(feeds)

    def _run(self, feeds: Feeds) -> dict[str, np.ndarray]:
        try:
            values = self._session.run(None, feeds)
        except Exception as exc:
            raise ModelRunError(f"onnxruntime cannot run {self.path}: {_first_line(exc)}") from None
        return dict(zip(self.output_names, values))

    def time(self, feeds: Feeds, max_runs: int = 20, budget_s: float = 1.0,
             min_runs: int = 3) -> list[float]:
        """Wall times (seconds) of repeated runs after one warm-up run."""
        self.run(feeds)
        chunked = _sample_slices(feeds) is not None
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < max_runs and (len(times) < min_runs
                                         or time.perf_counter() - start < budget_s):
            t0 = time.perf_counter()
            if chunked:
                self.run(feeds)
            else:
                self._session.run(None, feeds)
            times.append(time.perf_counter() - t0)
        return times


def _sample_slices(feeds: Feeds) -> list[slice] | None:
    """Slices of samples to run one at a time, or None to run the feeds whole: small
    feeds, or feeds that share no first axis of samples."""
    total = sum(a.nbytes for a in feeds.values())
    firsts = {a.shape[0] if a.ndim else None for a in feeds.values()}
    if total <= CHUNK_BYTES or len(firsts) != 1 or None in firsts:
        return None
    samples = firsts.pop()
    step = max(1, samples * CHUNK_BYTES // total)
    if step >= samples:
        return None
    return [slice(i, min(i + step, samples)) for i in range(0, samples, step)]


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
