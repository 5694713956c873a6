"""Running ONNX models in onnxruntime (CPU): input feeds, sessions, timed runs, and runs
with some weights replaced (`VariantRunner`, for budgeted compression).

onnxruntime is an optional dependency, imported only inside the functions that
run a model, so `modelpress --help` and `inspect` never load it.
"""

from __future__ import annotations

import importlib.util
import math
import statistics
import time
import zlib
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import onnx

from modelpress.core.errors import InputDataError, ModelRunError
from modelpress.core.evaluate import shared_samples
from modelpress.formats.onnx.feeds import (MAX_INPUT_BYTES, first_line, listed_shapes, load_inputs,
                                           load_labels, megabytes)
from modelpress.formats.onnx.dims import (Feeds, InputSpec, graph_dims, input_specs, made_up_hint,
                                          resolve_dims)
from modelpress.formats.onnx.sessions import INSTALL_HINT, expose
from modelpress.formats.onnx.tensors import inline_tensor
from modelpress.formats.onnx.work_estimate import run_macs

# Integer inputs that feed no Gather get this range unless --input-range says otherwise.
DEFAULT_INT_RANGE = (0, 2)
# Ops that pass integer ids through unchanged on their way to a Gather.
_PASS_THROUGH = {"Cast", "Reshape", "Unsqueeze", "Squeeze", "Flatten", "Identity", "Expand"}

# Inputs larger than this run in slices of samples (along the first axis they all share),
# so a model's activations stay bounded however many samples there are.
CHUNK_BYTES = 4 << 20


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
    shapes = resolve_dims(specs, dims or {}, graph_dims(model))
    total = sum(math.prod(shapes[s.name]) * s.dtype.itemsize for s in specs)
    if total > max_bytes:
        raise InputDataError(f"random inputs of shapes {listed_shapes(shapes)} take {megabytes(total)}, "
                             f"over the {megabytes(max_bytes)} limit for evaluation inputs; give "
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


def onnxruntime_available() -> bool:
    """True when onnxruntime can be imported."""
    return importlib.util.find_spec("onnxruntime") is not None


class Session:
    """An onnxruntime CPU session with the default options, which is what users get.

    The default optimization level fuses 4-bit blocked DequantizeLinear -> MatMul
    into MatMulNBits, which quantizes activations to int8: measured output error
    includes that effect.
    """

    def __init__(self, path: Path) -> None:
        try:
            import onnxruntime as ort  # heavy and optional: only when a model runs
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
            raise ModelRunError(f"onnxruntime cannot load {path}: {first_line(exc)}") from None
        self.path = Path(path)
        self.output_names = [o.name for o in self._session.get_outputs()]

    def run(self, feeds: Feeds, fixed: Feeds | None = None) -> dict[str, np.ndarray]:
        """Every output by name; large inputs run in slices of samples (see CHUNK_BYTES).
        `fixed`: more inputs given whole to every slice (weights made inputs)."""
        slices = _sample_slices(feeds)
        fixed = fixed or {}
        if slices is not None:
            parts = [self._run({**{name: array[s] for name, array in feeds.items()}, **fixed})
                     for s in slices]
            counts = [s.stop - s.start for s in slices]
            if all(v.ndim and v.shape[0] == n for part, n in zip(parts, counts)
                   for v in part.values()):
                return {name: np.concatenate([part[name] for part in parts])
                        for name in self.output_names}
            # Some output does not follow the samples (e.g. a reduction): run whole.
        return self._run({**feeds, **fixed})

    def _run(self, feeds: Feeds) -> dict[str, np.ndarray]:
        try:
            values = self._session.run(None, feeds)
        except Exception as exc:
            raise ModelRunError(f"onnxruntime cannot run {self.path}: {first_line(exc)}") from None
        return dict(zip(self.output_names, values))

    def run_raw(self, feeds: Feeds) -> None:
        """One run whose outputs are dropped (timing; the feeds already ran once); large
        inputs run in slices of samples, as in `run`."""
        slices = _sample_slices(feeds)
        for part in [feeds] if slices is None else \
                ({name: array[s] for name, array in feeds.items()} for s in slices):
            self._session.run(None, part)

    def time(self, feeds: Feeds, max_runs: int = 20, budget_s: float = 1.0,
             min_runs: int = 3) -> list[float]:
        """Wall times (seconds) of repeated runs after one warm-up run."""
        self.run(feeds)
        times: list[float] = []
        start = time.perf_counter()
        while len(times) < max_runs and (len(times) < min_runs
                                         or time.perf_counter() - start < budget_s):
            t0 = time.perf_counter()
            self.run_raw(feeds)
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


def _sample_slices(feeds: Feeds) -> list[slice] | None:
    """Slices of samples to run one at a time, or None to run the feeds whole: small
    feeds, or feeds that share no first axis of samples."""
    total = sum(a.nbytes for a in feeds.values())
    samples = shared_samples(feeds.values())
    if total <= CHUNK_BYTES or samples is None:
        return None
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
        raise ModelRunError(f"{path}: not a valid ONNX model ({first_line(exc)})") from None


def describe_feeds(feeds: Feeds) -> dict[str, Any]:
    """Shapes and dtypes of the feeds, JSON-safe."""
    return {name: {"shape": list(a.shape), "dtype": str(a.dtype)} for name, a in feeds.items()}


# Runs with some weights replaced (modelpress.app.sensitivity measures how much each
# candidate encoding of each weight changes the outputs). Writing and loading a model per
# candidate would cost far more than running it, so the weights are made graph inputs of
# one copy of the model and each run feeds the original arrays with the measured one
# swapped. onnxruntime cannot fold or prepack such weights at load: measured with
# onnxruntime 1.32 on 2 cores, runs of magika and open_nsfw took 1.1-1.3x the original's
# (interleaved), and outputs matched the original's to a relative 4e-7.
VARIANTS_FILE = "weights-as-inputs.onnx"


# Ops that squash an output into probabilities: per-weight errors are measured before them.
_NORMALIZING = {"Softmax", "LogSoftmax", "Sigmoid"}


def signals(model: onnx.ModelProto) -> dict[str, str]:
    """For each graph output, the value per-weight errors are measured on: the input of a
    final Softmax, LogSoftmax or Sigmoid, or of the Exp of a final Div (a softmax written
    out), else the output itself. Near 0 or 1, a probability moves little and in ways that
    cancel between weights, so that the errors of different weights do not add up there,
    and a few samples tell little; the logits before it do."""
    producers = {out: node for node in model.graph.node for out in node.output}
    found = {}
    for output in model.graph.output:
        node, name = producers.get(output.name), output.name
        if node is not None and node.domain in ("", "ai.onnx") and node.input:
            if node.op_type in _NORMALIZING:
                name = node.input[0]
            elif node.op_type == "Div":
                exp = producers.get(node.input[0])
                if exp is not None and exp.op_type == "Exp" and exp.input:
                    name = exp.input[0]
        found[output.name] = name
    return found


def weights_as_inputs(path: Path, names: set[str], dst: Path) -> tuple[list[str], dict[str, str]]:
    """Write to `dst` a copy of the model at `path` (external data read in) whose main-graph
    initializers among `names` are graph inputs instead, and whose `signals` are outputs
    too; the names made inputs (graph order) and the signals. Weights elsewhere (Constant
    nodes, subgraphs) stay as they are."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        raise ModelRunError(f"{path}: not a valid ONNX model ({first_line(exc)})") from None
    graph = model.graph
    found = signals(model)
    expose(model, found.values())
    listed = {value.name for value in graph.input}
    kept, moved = [], []
    for tensor in graph.initializer:
        if tensor.name in names:
            moved.append(tensor)
        else:
            kept.append(inline_tensor(path, tensor))
    del graph.initializer[:]
    graph.initializer.extend(kept)
    for tensor in moved:
        if tensor.name not in listed:  # IR < 4 models also list initializers as inputs
            graph.input.append(onnx.helper.make_tensor_value_info(
                tensor.name, tensor.data_type, list(tensor.dims)))
    try:
        onnx.save_model(model, str(dst))
    except (ValueError, OSError) as exc:  # protobuf's 2 GB limit, a full disk
        raise ModelRunError(f"{path}: cannot prepare the model for per-weight runs "
                            f"({first_line(exc)})") from None
    return [t.name for t in moved], found


class VariantRunner:
    """The model with its weights `weights` (name -> original array) fed as inputs, run
    on `feeds`; `outputs(replaced)` runs it with some of them swapped. Its outputs include
    `signals` (output name -> the value its per-weight errors are measured on)."""

    def __init__(self, path: Path, weights: Mapping[str, np.ndarray], feeds: Feeds,
                 workdir: Path) -> None:
        dst = Path(workdir) / VARIANTS_FILE
        made, self.signals = weights_as_inputs(Path(path), set(weights), dst)
        self.names = made
        self.weights = {name: np.ascontiguousarray(weights[name]) for name in made}
        self.feeds = feeds
        self._session = Session(dst)
        dst.unlink()

    def outputs(self, replaced: Mapping[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Every output, with the weights in `replaced` (name -> array of the original's
        shape and dtype) instead of the originals."""
        fixed = dict(self.weights)
        for name, array in (replaced or {}).items():
            original = fixed[name]
            fixed[name] = np.ascontiguousarray(array, dtype=original.dtype).reshape(
                original.shape)
        return self._session.run(self.feeds, fixed)


__all__ = ["Feeds", "InputSpec", "Session", "describe_feeds", "first_line", "gather_ranges", "input_specs",
           "interleaved_times", "load_graph", "load_inputs", "load_labels", "made_up_hint",
           "median_ms", "quartiles_ms", "graph_dims",
           "MAX_INPUT_BYTES", "onnxruntime_available", "random_inputs", "resolve_dims",
           "VariantRunner", "run_macs", "signals", "weights_as_inputs"]
