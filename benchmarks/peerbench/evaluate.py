"""Run original and compressed models in onnxruntime: output error, top-1 agreement, latency."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

Feeds = dict[str, np.ndarray]


def logits_name(model: onnx.ModelProto) -> str:
    """The tensor whose error is measured: the first output, or the scores entering it when that
    output is a softmax (a Softmax node, or Exp(x - max) / sum as jax exports it), because
    probabilities near 0 and 1 hide most of the error."""
    out = model.graph.output[0].name
    producer = {o: n for n in model.graph.node for o in n.output}
    node = producer.get(out)
    if node is not None and node.op_type == "Softmax":
        return node.input[0]
    if node is not None and node.op_type == "Div":
        exp = producer.get(node.input[0])
        if exp is not None and exp.op_type == "Exp":
            sub = producer.get(exp.input[0])
            return sub.input[0] if sub is not None and sub.op_type == "Sub" else exp.input[0]
    return out


def _session(model: onnx.ModelProto | str | Path, threads: int = 0,
             config: dict[str, str] | None = None):
    import onnxruntime as ort

    ort.set_default_logger_severity(4)  # a peer's model failing to run is a table row, not a log
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 4
    for key, value in (config or {}).items():
        opts.add_session_config_entry(key, value)
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


def run_tensor(model: onnx.ModelProto, name: str, feeds: Feeds) -> np.ndarray:
    """Run the model (default session options) and return tensor `name`, exposed as an extra
    output if it is an intermediate."""
    if name not in {o.name for o in model.graph.output}:
        if name not in {o for n in model.graph.node for o in n.output}:
            raise KeyError(f"tensor {name!r} not in this model")
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        copy.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
        model = copy
    import onnxruntime as ort

    quiet = ort.RunOptions()
    quiet.log_severity_level = 4  # a failure is raised and reported in the table
    return np.asarray(_session(model).run([name], feeds, quiet)[0], np.float64)


@dataclass
class OutputError:
    """Relative L2 error of the measured tensor over all samples, and top-1 agreement (share of
    rows, over the last axis, whose argmax is unchanged; None for a single score)."""

    rel_l2: float
    top1: float | None
    tensor: str


def output_error(reference: np.ndarray, model: onnx.ModelProto, name: str, feeds: Feeds) -> OutputError:
    """Error of `model`'s tensor `name` against the reference outputs on the same feeds. If the
    model no longer has that tensor (a tool removed the node, e.g. a float-to-float Cast before
    the softmax), the same place found the same way in this model (`logits_name`) is measured,
    and named in the result's `tensor`."""
    tensors = {o.name for o in model.graph.output} | {o for n in model.graph.node for o in n.output}
    if name not in tensors:
        name = logits_name(model)
    out = run_tensor(model, name, feeds)
    if out.shape != reference.shape:
        raise ValueError(f"output shape {out.shape} differs from the original's {reference.shape}")
    rel = float(np.linalg.norm(out - reference) / max(np.linalg.norm(reference), 1e-30))
    top1 = None
    if reference.ndim >= 1 and reference.shape[-1] > 1:
        a = reference.reshape(-1, reference.shape[-1]).argmax(1)
        b = out.reshape(-1, out.shape[-1]).argmax(1)
        top1 = float(np.mean(a == b))
    return OutputError(rel, top1, name)


@dataclass
class Latency:
    """Median run times (seconds) of the original and compressed models over interleaved runs."""

    original: float
    compressed: float
    runs: int

    @property
    def ratio(self) -> float:
        return self.compressed / self.original


def latency(original: str | Path, compressed: str | Path, feeds: Feeds, threads: int,
            budget: float = 2.0, min_runs: int = 5, max_runs: int = 100_000,
            original_session=None, config: dict[str, str] | None = None,
            block_seconds: float = 0.05) -> Latency:
    """Median latency of each model with default session options (`threads` intra-op threads,
    0 = onnxruntime's default), as many runs as fit in about `budget` seconds after a warm-up
    (`max_runs` only guards against a zero budget: with 200, a 0.2 ms model stopped after
    40 ms and byte-identical files measured 0.92-1.11x; with the whole budget, 0.98-1.04x).
    The two sessions alternate in blocks of consecutive runs (about `block_seconds` each) and the
    first run of every block is not counted: after a run, onnxruntime's worker threads spin for
    a while, and on a small machine they slow down the other session's next run (a
    millisecond-long model then measured 0.1x or 18x). `config` adds session config entries to
    the compressed model's session only (the original runs with default options)."""
    a = original_session or _session(original, threads)
    b = _session(compressed, threads, config)
    per_run = []
    for s in (a, b):
        s.run(None, feeds)
        t = time.perf_counter()
        s.run(None, feeds)
        per_run.append(time.perf_counter() - t)
    block = 1 + max(1, min(50, int(block_seconds / max(min(per_run), 1e-6))))
    times: tuple[list[float], list[float]] = ([], [])
    start = time.perf_counter()
    while len(times[1]) < max_runs:
        for i, s in enumerate((a, b)):
            for k in range(block):
                t = time.perf_counter()
                s.run(None, feeds)
                if k:  # the block's first run pays for the other session's spinning threads
                    times[i].append(time.perf_counter() - t)
        if len(times[1]) >= min_runs and time.perf_counter() - start > budget:
            break
    return Latency(statistics.median(times[0]), statistics.median(times[1]), len(times[1]))


NO_QDQ = {"session.disable_quant_qdq": "1"}  # onnxruntime: fold DequantizeLinear weights at load


def original_session(path: str | Path, threads: int):
    """A default-options session of the original model, reused across compressed models."""
    return _session(path, threads)


def head(feeds: Feeds, samples: int) -> Feeds:
    """The first `samples` rows of each input (the latency batch)."""
    return {k: v[:samples] for k, v in feeds.items()}
