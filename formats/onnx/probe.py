"""Output-side moments: how much the model's outputs move when a layer's output does.

GPTQ's H weighs a weight's error by the inputs it multiplies; how the
layer's output error then reaches the model's outputs it takes as the same
for every output channel. For a layer whose output y (width N) reaches the
model's outputs through Jacobians J_p (one per position p), the squared
output error of a change e at every position is sum_p |J_p e_p|^2; its
second moments G = sum_p J_p^T J_p [N, N] (each model output divided by its
squared norm, so each counts as its relative error does) let the rounding
weigh every output channel, and every direction between them, by that
(`modelpress.core.quantize.gptq`: H for the inputs, G for the outputs, the
Kronecker approximation of K-FAC). For a Gather table the looked-up row is
the layer's output: G over the hidden width is the whole metric of a row's
error (there are no inputs to mix).

onnxruntime runs no backward pass, so G is probed: the calibration model
with `delta` added to the layer's output, one direction i of N at a time,
+-STEP x the output's RMS (central differences), with a random sign per
position (cross terms between positions average out: E[s_p s_q] = 0).
Each model output element is a row of J; G's off-diagonal entries are
shrunk by their estimated noise over those rows, as H's are
(`moments.shrunk_moments`): from few outputs, G is mostly noise. For
a Gather table, the sign is per looked-up id instead: a table row's error
is the same wherever its id recurs, and those copies add up coherently.
That is 2 N runs on PROBE_SAMPLES samples per layer: layers wider than
MAX_WIDTH, and any past MAX_DIRECTIONS directions for the whole model,
are not probed (their rounding is GPTQ's as before), nor layers whose
output is a model output (G is the identity there: nothing to gain).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from modelpress.core.errors import ModelRunError
from modelpress.core.evaluate import shared_samples
from modelpress.core.tensorinfo import InputStats, SecondMoments
from modelpress.formats.onnx.calibration_run import SAMPLES_PER_RUN, chunks
from modelpress.formats.onnx.feeds import load_inputs
from modelpress.formats.onnx.moments import Sums, shrunk_moments
from modelpress.formats.onnx.run import first_line
from modelpress.formats.onnx.sessions import graph_of, model_session

MAX_WIDTH = 512
"""Widest layer output probed (G is width x width; 2 x width runs)."""
MAX_DIRECTIONS = 1024
"""Directions probed over the whole model (2 runs each)."""
MAX_MACS = 1 << 35
"""Multiply-adds of the probe runs, estimated (the sample transformer's 704 directions:
2^34.8; magika's first layer alone would take 2^38.5, minutes)."""
MAX_ELEMENTS = 1 << 24
"""Output elements x width held for one layer's G (float32; more: every k-th element)."""
STEP = 1e-2
"""Perturbation, as a share of the probed output's RMS."""
_SEED = 20240
_DELTA = "modelpress.probe.delta"


@dataclass(frozen=True)
class Probe:
    """A weight's layer output (`activation`, width `width`) and, for a Gather table, the
    indices it looks up (`ids`)."""

    weight: str
    activation: str
    width: int
    ids: str | None = None


def probed_stats(path: Path, model: onnx.ModelProto, calibration: Path,
                 stats: dict[str, InputStats], tables: dict[str, tuple[int, ...]],
                 sizes: dict[str, int]) -> tuple[dict[str, InputStats], list[str]]:
    """`stats` (of MatMul/Gemm/Conv weights, from `calibrate.input_stats`) with the output
    moments of the layers probed, and stats for the Gather `tables` (name -> dims)
    probed; notes. The probes' multiply-adds, estimated from the layers in `stats`
    (input rows x weights, per calibration sample), stay within MAX_MACS."""
    feeds = load_inputs(model, calibration)
    samples = shared_samples(feeds.values()) or 1
    per_sample = sum(s.samples * sizes[n] for n, s in stats.items()) / max(samples, 1)
    cost = 2 * min(samples, SAMPLES_PER_RUN) * max(per_sample, 1.0)
    layers = {n: s for n, s in stats.items() if s.second_moments is not None}
    weights = {n: dims for n, dims in _dims(model).items() if n in layers or n in tables}
    found = probes(model, weights, min(MAX_DIRECTIONS, int(MAX_MACS // cost)))
    try:
        metrics = output_moments(path, feeds, calibration, found)
    except ModelRunError as exc:  # the calibration run worked: round without G
        return stats, [f"--calibration: output-side moments not probed ({exc})"]
    stats = dict(stats)
    for name, g in metrics.items():
        if name in tables:
            stats[name] = InputStats(np.zeros(len(g)), np.diagonal(g).copy(), len(g),
                                     SecondMoments.of(g))
        else:
            stats[name] = dataclasses.replace(stats[name], output_moments=SecondMoments.of(g))
    if not metrics:
        return stats, []
    return stats, [f"--calibration: output-side moments probed for {len(metrics)} tensors "
                   f"({sum(len(g) for g in metrics.values())} directions, 2 runs each)"]


def _dims(model: onnx.ModelProto) -> dict[str, tuple[int, ...]]:
    """The float32 initializers' dims (a probe adds float32 deltas)."""
    return {t.name: tuple(t.dims) for t in model.graph.initializer
            if t.data_type == onnx.TensorProto.FLOAT}


def probes(model: onnx.ModelProto, weights: dict[str, tuple[int, ...]],
           directions: int = MAX_DIRECTIONS) -> list[Probe]:
    """The layers among `weights` (name -> dims) that are probed, in graph order: a 2-D
    MatMul/Gemm weight or a Gather table (axis 0) used by one main-graph node only, whose
    output is no model output, within MAX_WIDTH and `directions` in all."""
    uses: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in weights:
                uses.setdefault(name, []).append((node, i))
    outputs = {o.name for o in model.graph.output}
    constants = {t.name for t in model.graph.initializer}
    single = {name for name, used in uses.items() if len(used) == 1}
    found, total = [], 0
    for node in model.graph.node:
        for index, name in enumerate(node.input):
            if name not in single or len(weights[name]) != 2 or node.output[0] in outputs:
                continue
            probe = _probe(node, index, name, weights[name], constants)
            if probe is not None and probe.width <= MAX_WIDTH \
                    and total + probe.width <= directions:
                found.append(probe)
                total += probe.width
    return found


def _probe(node: onnx.NodeProto, index: int, name: str, dims: tuple[int, ...],
           constants: set[str]) -> Probe | None:
    attrs = {a.name: a.i for a in node.attribute if a.type == onnx.AttributeProto.INT}
    out = node.output[0]
    if node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "MatMul" and index == 1:
        return Probe(name, out, dims[1])
    if node.op_type == "Gemm" and index == 1:
        return Probe(name, out, dims[0] if attrs.get("transB", 0) else dims[1])
    if node.op_type == "Gather" and index == 0 and attrs.get("axis", 0) == 0 \
            and node.input[1] not in constants:
        return Probe(name, out, dims[1], ids=node.input[1])
    return None


def output_moments(path: Path, feeds: dict[str, np.ndarray], calibration: Path,
                   found: list[Probe]) -> dict[str, np.ndarray]:
    """G [width, width] (float64) of each probe, from the first calibration samples."""
    if not found:
        return {}
    chunk = next(chunks(feeds, calibration, graph_of(path)))
    graph = graph_of(path)
    outputs = [o.name for o in graph.graph.output]
    extra = sorted({p.activation for p in found} | {p.ids for p in found if p.ids} - set(chunk))
    session = model_session(_probe_model(graph, found, extra), path)
    zero = {f"{_DELTA}.{i}": np.zeros((1,), np.float32) for i in range(len(found))}
    base = _run(session, outputs + extra, {**chunk, **zero}, calibration, path)
    values = {**chunk, **dict(zip(outputs + extra, base))}
    norms = [max(float(np.vdot(values[o], values[o])), 1e-30) for o in outputs]
    rng = np.random.default_rng(_SEED)
    metrics = {}
    for i, probe in enumerate(found):
        act = np.asarray(values[probe.activation])
        if act.dtype.kind != "f" or act.ndim < 1 or act.shape[-1] != probe.width:
            continue
        signs = _signs(rng, act.shape[:-1], None if probe.ids is None
                       else np.asarray(values[probe.ids]))
        if signs is None:
            continue
        step = np.float32(STEP * max(float(np.sqrt(np.mean(np.square(act, dtype=np.float64)))),
                                     1e-12))
        # Every stride-th output element (an unbiased share of J's rows): bounded memory.
        stride = -(-probe.width * sum(values[o].size for o in outputs) // MAX_ELEMENTS)
        columns = []
        for j in range(probe.width):
            delta = np.zeros(act.shape, np.float32)
            delta[..., j] = signs * step
            feed = {**chunk, **zero}
            moved = []
            for sign in (1, -1):
                feed[f"{_DELTA}.{i}"] = delta * np.float32(sign)
                moved.append(_run(session, outputs, feed, calibration, path))
            columns.append(np.concatenate([
                ((np.asarray(a, np.float32) - b) / np.float32(2 * step * np.sqrt(n))).ravel()
                for a, b, n in zip(moved[0], moved[1], norms)]))
            columns[-1] = columns[-1][::stride]
        sums = Sums(1, probe.width, True)
        if sums.add(np.ascontiguousarray(np.stack(columns).T)[None]):
            metrics[probe.weight] = shrunk_moments(sums)[0]
    return metrics


def _signs(rng: np.random.Generator, lead: tuple[int, ...],
           ids: np.ndarray | None) -> np.ndarray | None:
    """A random sign per position (shape `lead`), or per id of `ids` where given (None
    when the ids do not lay out the positions)."""
    if ids is None:
        return rng.choice(np.array([-1, 1], np.float32), size=lead)
    if ids.shape != lead or ids.dtype.kind not in "iu" or ids.size == 0 or ids.min() < 0:
        return None
    table = rng.choice(np.array([-1, 1], np.float32), size=int(ids.max()) + 1)
    return table[ids]


def _probe_model(model: onnx.ModelProto, found: list[Probe],
                 extra: list[str]) -> onnx.ModelProto:
    """`model` with a delta input added to each probe's activation, and `extra` (the
    activations and ids) as outputs too."""
    probed = {p.activation: i for i, p in enumerate(found)}
    graph = model.graph
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name in probed:
                node.input[k] = f"{name}.probed"
    nodes = []
    for node in graph.node:
        nodes.append(node)
        for name in node.output:
            if name in probed:
                nodes.append(onnx.helper.make_node(
                    "Add", [name, f"{_DELTA}.{probed[name]}"], [f"{name}.probed"]))
    del graph.node[:]
    graph.node.extend(nodes)
    for i in range(len(found)):
        graph.input.append(onnx.helper.make_tensor_value_info(f"{_DELTA}.{i}",
                                                              onnx.TensorProto.FLOAT, None))
    present = {o.name for o in graph.output}
    graph.output.extend(onnx.ValueInfoProto(name=n) for n in extra if n not in present)
    return model


def _run(session, names: list[str], feed: dict[str, np.ndarray], calibration: Path,
         path: Path) -> list:
    try:
        return session.run(names, feed)
    except Exception as exc:
        raise ModelRunError(f"--calibration {calibration}: onnxruntime cannot run {path} "
                            f"with a probe added: {first_line(exc)}") from None
