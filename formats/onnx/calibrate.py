"""Input statistics of MatMul/Gemm/Conv weights: the original model run on calibration data.

For `compress --calibration FILE.npz`: each weight used only as the weight
input of MatMul, Gemm (B) or Conv nodes of the main graph gets the mean and
variance of each of its inputs and, for `quantize --method gptq`, their
second moments H = X^T X / rows (`modelpress.core.tensorinfo.InputStats`),
over every input row the calibration data produces (samples x positions;
for a Conv the im2col rows of its input, see `moments`; H's off-diagonal
entries shrunk by their estimated noise, `moments.shrunk_moments`). The
original model runs in onnxruntime (CPU, default options) with those activations
added as outputs, a few samples at a time (`calibration_run.SAMPLES_PER_RUN`);
external data is read from the model's folder in place.

Memory: a layer's H is groups x K x K floats, summed in float64 while
collected. A pass over the calibration data collects the matrices of layers
holding at most PASS_ELEMENTS of them together (256 MB of sums; a larger
layer runs alone); the first pass runs before compression starts (with
every layer's mean and variance), the others when the pipeline reaches
their layers, and each matrix is dropped once its weight has taken it. A
layer over MAX_ELEMENTS (K above 8192 for an ungrouped layer: a float64
inverse of 512 MB and K^3 work) gets no H: gptq falls back to the plain
rounding there, and the notes name it.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from modelpress.core.tensorinfo import InputStats, SecondMoments

from modelpress.formats.onnx.calibration_run import chunks, exposing_session, run_exposed
from modelpress.formats.onnx.graph import graphs
from modelpress.formats.onnx.moments import (ConvGeometry, Sums, conv_rows, matmul_rows,
                                             shrunk_moments)
from modelpress.formats.onnx.run import load_inputs

MAX_ELEMENTS = 1 << 26
"""Largest H (groups x K x K) collected for one layer."""
PASS_ELEMENTS = 1 << 25
"""H elements collected in one pass over the calibration data (float64 sums)."""


@dataclass(frozen=True)
class LayerInput:
    """The activation that multiplies a weight: its name, whether K is its first axis
    (Gemm with transA=1) rather than its last, and for a Conv how the kernel slides."""

    activation: str
    k_first: bool = False
    conv: ConvGeometry | None = None


@dataclass(frozen=True)
class Layer:
    """A weight's uses and the shape of its input rows (groups x K)."""

    uses: tuple[LayerInput, ...]
    groups: int
    k: int

    @property
    def elements(self) -> int:
        return self.groups * self.k * self.k


def layer_inputs(model: onnx.ModelProto, weights: dict[str, tuple[int, ...]]) -> dict[str, Layer]:
    """For each of `weights` (name -> dims) used only as the weight of main-graph MatMul, Gemm
    or Conv nodes that agree on its input rows, those uses. Weights with any other use are
    left out."""
    found: dict[str, list[tuple[LayerInput, int, int]]] = {}
    other: set[str] = set()
    for graph in graphs(model.graph):
        for node in graph.node:
            for i, name in enumerate(node.input):
                if name not in weights:
                    continue
                use = None
                if (graph is model.graph and node.domain in ("", "ai.onnx") and i == 1
                        and node.input[0]):
                    use = _use(node, weights[name])
                if use is None:
                    other.add(name)
                else:
                    found.setdefault(name, []).append(use)
    outputs = {o.name for o in model.graph.output}
    layers = {}
    for name, uses in found.items():
        if name in other or name in outputs or len({u[1:] for u in uses}) != 1:
            continue
        layers[name] = Layer(tuple(u[0] for u in uses), uses[0][1], uses[0][2])
    return layers


def _use(node: onnx.NodeProto, dims: tuple[int, ...]) -> tuple[LayerInput, int, int] | None:
    """A node's use of its weight input: (use, groups, K), or None if not a layer's."""
    attrs = {a.name: a.i for a in node.attribute if a.type == onnx.AttributeProto.INT}
    if node.op_type == "MatMul" and len(dims) == 2:
        return LayerInput(node.input[0]), 1, dims[0]
    if node.op_type == "Gemm" and len(dims) == 2:
        return (LayerInput(node.input[0], bool(attrs.get("transA", 0))), 1,
                dims[1] if attrs.get("transB", 0) else dims[0])
    if node.op_type == "Conv" and len(dims) >= 3:
        geometry = ConvGeometry.of(node, dims)
        if geometry.group < 1 or dims[0] % geometry.group:
            return None
        return (LayerInput(node.input[0], conv=geometry), geometry.group,
                dims[1] * math.prod(dims[2:]))
    return None


def input_stats(path: Path, graph: onnx.ModelProto, calibration: Path,
                weights: dict[str, tuple[int, ...]]) -> tuple[dict[str, InputStats], list[str]]:
    """Statistics for each weight of `weights` (name -> dims) that `layer_inputs` accepts,
    from running the model at `path` (whose graph is `graph`) on the arrays in
    `calibration`; and notes for the report. The model is loaded and run only if some
    weight qualifies; the calibration file is checked in any case."""
    feeds = load_inputs(graph, calibration)
    layers = layer_inputs(graph, weights)
    if not layers:
        return {}, [f"--calibration {calibration}: not used (the recipe quantizes no MatMul, "
                    "Gemm or Conv weight)"]
    large = [n for n, layer in layers.items() if layer.elements > MAX_ELEMENTS]
    cut = passes({n: layer for n, layer in layers.items() if n not in large})
    run = _Run(path, graph, calibration, feeds, layers)
    first = run.sums(list(layers), set(cut[0]) if cut else set())
    source = _Moments(run, cut, {n: s for n, s in first.items() if s.product is not None})
    stats, skipped = {}, []
    for name, sums in first.items():
        if sums.rows == 0:
            skipped.append(name)
            continue
        layer = layers[name]
        mean = sums.total / sums.rows
        var = sums.square / sums.rows - mean * mean
        if layer.uses[0].conv is None:
            mean, var = mean[0], var[0]
        moments = None
        if name not in large:
            shape = (layer.k, layer.k) if layer.uses[0].conv is None else (
                layer.groups, layer.k, layer.k)
            moments = SecondMoments(shape, _loader(source, name), _releaser(source, name))
        stats[name] = InputStats(mean, var, sums.rows, moments)
    return stats, _notes(calibration, stats, skipped, large, layers, len(cut))


def _loader(source: _Moments, name: str):
    return lambda: source.load(name)


def _releaser(source: _Moments, name: str):
    return lambda: source.release(name)


def _notes(calibration: Path, stats: dict[str, InputStats], skipped: list[str],
           large: list[str], layers: dict[str, Layer], passes: int) -> list[str]:
    notes = []
    if stats:
        rows = min(s.samples for s in stats.values())
        notes.append(f"--calibration {calibration}: input statistics for {len(stats)} "
                     f"MatMul/Gemm/Conv weights (at least {rows} input rows each; "
                     f"{passes} pass{'es' if passes != 1 else ''} over the data)")
    if skipped:
        notes.append(f"--calibration: no usable inputs for {len(skipped)} weights (not float, "
                     f"or not the width the weight takes), e.g. {skipped[0]!r}; rounded "
                     "without statistics")
    for name in large:
        layer = layers[name]
        notes.append(f"--calibration: {name!r} takes {layer.k} inputs per output"
                     f"{f' in each of {layer.groups} groups' if layer.groups > 1 else ''}; "
                     f"its {layer.elements:,}-element input moments exceed the limit of "
                     f"{MAX_ELEMENTS:,}, so gptq does not round it (plain rounding)")
    return notes


def passes(layers: dict[str, Layer], share: int = 1) -> list[list[str]]:
    """Layers in order, cut into passes of at most PASS_ELEMENTS / `share` moments (one at
    least): `share` matrices of that size are held per layer."""
    limit = PASS_ELEMENTS // share
    found: list[list[str]] = []
    held = 0
    for name, layer in layers.items():
        if not found or held + layer.elements > limit:
            found.append([])
            held = 0
        found[-1].append(name)
        held += layer.elements
    return found


class _Moments:
    """Each layer's H, collected by the pass that holds it when first asked for, and
    dropped when taken (asked for again, it is collected again)."""

    def __init__(self, run: _Run, passes: list[list[str]], ready: dict[str, Sums]) -> None:
        self._run, self._passes = run, passes
        self._pass_of = {name: i for i, names in enumerate(passes) for name in names}
        self._ready = {n: _matrix(s, run.layers[n]) for n, s in ready.items()}
        self._taken: set[str] = set()
        self._lock = threading.Lock()

    def load(self, name: str) -> np.ndarray:
        with self._lock:
            if name not in self._ready:
                wanted = [n for n in self._passes[self._pass_of[name]]
                          if n == name or (n not in self._taken and n not in self._ready)]
                sums = self._run.sums(wanted, set(wanted))
                self._ready.update((n, _matrix(s, self._run.layers[n])) for n, s in sums.items()
                                   if s.rows)
            self._taken.add(name)
            self._close_when_served()
            return self._ready.pop(name)

    def release(self, name: str) -> None:
        """`name`'s H will not be asked for (sequential calibration gave it other moments)."""
        with self._lock:
            self._taken.add(name)
            self._ready.pop(name, None)
            self._close_when_served()

    def _close_when_served(self) -> None:
        if self._taken.issuperset(self._pass_of):
            self._run.close()  # every layer served: the session's memory goes


def _matrix(sums: Sums, layer: Layer) -> np.ndarray:
    """H in float32: [K, K] for a MatMul/Gemm weight, [groups, K, K] for a Conv weight."""
    h = shrunk_moments(sums).astype(np.float32)
    return h if layer.uses[0].conv is not None else h[0]


class _Run:
    """The original model in onnxruntime with the layers' inputs as outputs, run on the
    calibration arrays a few samples at a time (the session is made when first needed)."""

    def __init__(self, path: Path, graph: onnx.ModelProto, calibration: Path,
                 feeds: dict[str, np.ndarray], layers: dict[str, Layer]) -> None:
        self._path, self._graph, self._calibration = path, graph, calibration
        self._feeds, self.layers = feeds, layers
        self._session = None

    def close(self) -> None:
        self._session = None

    def sums(self, names: list[str], moments: set[str]) -> dict[str, Sums]:
        """One pass: the sums of `names` (with X^T X for those in `moments`); a weight
        whose inputs do not fit it gets empty sums."""
        graph_inputs = {i.name for i in self._graph.graph.input}
        wanted = sorted({u.activation for n in names for u in self.layers[n].uses}
                        - graph_inputs)
        sums = {n: Sums(self.layers[n].groups, self.layers[n].k, n in moments) for n in names}
        bad: set[str] = set()
        for chunk in chunks(self._feeds, self._calibration, self._graph):
            values = dict(zip(wanted, self._execute(wanted, chunk))) if wanted else {}
            values.update({n: chunk[n] for n in graph_inputs if n in chunk})
            for name in names:
                if name not in bad and not self._add(sums[name], name, values):
                    bad.add(name)
        for name in bad:
            sums[name] = Sums(1, 0, False)
        return sums

    def _add(self, sums: Sums, name: str, values: dict[str, np.ndarray]) -> bool:
        """Add a chunk's rows of every use of `name`; False if some use does not fit."""
        layer = self.layers[name]
        for use in layer.uses:
            value = np.asarray(values[use.activation])
            if value.dtype.kind != "f":
                return False
            if use.conv is None:
                blocks = matmul_rows(value, layer.k, use.k_first)
            elif value.ndim == 2 + len(use.conv.kernel) and \
                    value.shape[1] * math.prod(use.conv.kernel) == layer.k * layer.groups:
                blocks = conv_rows(value, use.conv)
            else:
                return False
            added = [sums.add(block) for block in blocks]
            if not added:
                return False
        return True

    def _execute(self, wanted: list[str], chunk: dict[str, np.ndarray]) -> list[np.ndarray]:
        if self._session is None:
            self._session = exposing_session(
                self._path, [u.activation for layer in self.layers.values() for u in layer.uses])
        return run_exposed(self._session, wanted, chunk, self._path, self._calibration)
