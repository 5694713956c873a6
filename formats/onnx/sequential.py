"""Sequential calibration: each layer's inputs as the model with the layers before it rounded
produces them, and how far they are from the original model's.

GPTQ on the original model's statistics makes each layer's own output error small, but a
layer's inputs come from layers that are rounded too, and their errors add up through the
model. Rounded in order, a layer can take some of them back: with X its input rows in the
original model and X~ those of the model whose earlier layers are rounded (same rows), the
rounded weight Q of a layer y = x W that keeps the model closest to the original solves
min ||X W - X~ Q||^2 (the asymmetric calibration of GPTAQ, Li et al. 2025). Writing
H~ = X~^T X~ / rows and S = X~^T (X - X~) / rows, that is GPTQ under H~ towards the moved
weight W' = W + H~^-1 S W (the least-squares fit of X W on X~; the error then splits into
||X~ (W' - Q)||^2 and a constant). `modelpress.core.quantize.gptq` takes (H~, S) from the
layer's `InputStats`; this module collects them.

Which layers: MatMul and Gemm weights. Conv weights keep the original model's statistics
(they are rounded first, with the other tensors that are no such layer): on magika, whose
convolution's outputs are pooled over positions before its head, the move lowered that
layer's error on the calibration rows (a layer objective of -6.6 against 26.6 without it,
0 being the float layer) but raised the model's output error by 12% on the calibration
inputs and 16% on others (0.0433 -> 0.0503 at 4 bits).

Cost and bounds: layers are taken in the order the graph reads their inputs; layers that read
the same activation are one step; layers that read a model input are left out (nothing
rounded changes it). The steps are cut into at most MAX_RUNS segments of about equal count:
a segment's layers see the model with every earlier segment's layers rounded (a pass of the
calibration data through the original and the rounded model, more where the segment's
matrices pass calibrate.PASS_ELEMENTS / 2; each layer's two matrices are held until it is
rounded, and its first-pass H is dropped). H~ is not shrunk as H is (the move is the least-
squares fit only with the matrices of the same rows; a layer has 4 rows per input at least).
Rounded tensors that are not main-graph initializers or Constant nodes stay as they are in
the rounded model (a note names them). A layer gets (H~, S) only when
its inputs have at least ROWS_PER_INPUT rows per input (K): from fewer rows the correction
fits the calibration rows and not the inputs (in a trial on magika's head, 16 rows for 512
inputs, the model's output error went from 0.0433 to 0.0569); the others keep the original
statistics.
The rounded weights are held as float32 while the run lasts: over MAX_HELD_BYTES, it is not
done.
On the sample transformer (9 tensors, 7 layers, 64 x 32 calibration rows; 4 bits) the
output error on its held-out set fell from 0.0456 to 0.0394 (0.623 -> 0.539 of rtn's); at
8 bits from 0.00442 to 0.00409.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from modelpress.core.blas import one_blas_thread
from modelpress.core.quantize.plan import has_second_moments
from modelpress.core.tensorinfo import SecondMoments, TensorInfo

from modelpress.formats.onnx.calibrate import Layer, layer_inputs, passes
from modelpress.formats.onnx.calibration_run import chunks, exposing_session, run_exposed
from modelpress.formats.onnx.moments import matmul_rows
from modelpress.formats.onnx.run import load_inputs
from modelpress.formats.onnx.sessions import expose, graph_of, model_session

MAX_RUNS = 8
"""Segments of the layers (runs of the calibration data through the rounded model)."""
ROWS_PER_INPUT = 4
"""Input rows per input (of K) a layer needs to get the correction."""
MAX_HELD_BYTES = 1 << 30
"""Rounded weights (float32) held for the rounded model at most."""


def segments(graph: onnx.ModelProto, layers: dict[str, Layer]) -> list[list[str]]:
    """`layers` in the order the main graph first reads their inputs (a step per activation),
    cut into at most MAX_RUNS segments of whole steps."""
    first: dict[str, int] = {}
    for index, node in enumerate(graph.graph.node):
        for name in node.input:
            first.setdefault(name, index)
    steps: dict[str, list[str]] = {}
    for name, layer in layers.items():
        steps.setdefault(layer.uses[0].activation, []).append(name)
    ordered = [names for _, names in sorted(steps.items(), key=lambda kv: first.get(kv[0], -1))]
    count = min(MAX_RUNS, len(ordered))
    cuts = [round(i * len(ordered) / count) for i in range(count + 1)] if count else [0]
    return [[n for step in ordered[a:b] for n in step] for a, b in zip(cuts, cuts[1:])]


def eligible(k: int, rows: int) -> bool:
    """Whether a layer of `k` inputs with `rows` input rows gets the correction (see
    ROWS_PER_INPUT)."""
    return rows >= ROWS_PER_INPUT * k


class _Cross:
    """Running sums of X~^T X~ and X~^T (X - X~) (float64)."""

    def __init__(self, layer: Layer) -> None:
        self.moments = np.zeros((layer.k, layer.k))
        self.cross = np.zeros((layer.k, layer.k))
        self.rows = 0
        self.bad = False

    def add(self, original: np.ndarray, rounded: np.ndarray) -> None:
        if self.bad or original.shape != rounded.shape or not np.isfinite(rounded).all():
            self.bad = True
            return
        with one_blas_thread():  # a threaded product rounds with the thread count
            self.moments += rounded[0].T @ rounded[0]
            self.cross += rounded[0].T @ (original[0] - rounded[0])
        self.rows += rounded.shape[1]

    def result(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(H~, S) as [K, K] (float64); None if some rows did not fit."""
        if self.bad or not self.rows:
            return None
        return self.moments / self.rows, self.cross / self.rows


def shifted_moments(path: Path, calibration: Path, feeds: dict[str, np.ndarray],
                    layers: dict[str, Layer], rounded: dict[str, np.ndarray]
                    ) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], list[str]]:
    """(H~, S) for each of `layers` (MatMul/Gemm), from the model at `path` run on the
    calibration feeds as it is and with `rounded` (name -> float32 weight) in place of
    those weights, a pass over the data per PASS_ELEMENTS / 2 of matrices; a layer whose
    inputs do not fit it is left out. Also the names of `rounded` that the rounded model
    could not take (not a main-graph initializer or Constant)."""
    graph = graph_of(path)
    wanted = sorted({u.activation for layer in layers.values() for u in layer.uses})
    session, missing = _rounded_session(graph, path, wanted, rounded)
    sessions = [exposing_session(path, wanted), session]
    found = {}
    for names in passes(layers, share=2):
        sums = {name: _Cross(layers[name]) for name in names}
        activations = sorted({u.activation for n in names for u in layers[n].uses})
        for chunk in chunks(feeds, calibration, graph):
            values = [dict(zip(activations, run_exposed(s, activations, chunk, path, calibration)))
                      for s in sessions]
            for name in names:
                for use in layers[name].uses:
                    pairs = zip(*(_rows(np.asarray(v[use.activation]), layers[name], use)
                                  for v in values))
                    for original, moved in pairs:
                        sums[name].add(original, moved)
        found.update((name, s.result()) for name, s in sums.items())
    return {name: r for name, r in found.items() if r is not None}, missing


def _rows(value: np.ndarray, layer: Layer, use):
    return matmul_rows(value, layer.k, use.k_first) if value.dtype.kind == "f" else iter(())


def _rounded_session(graph: onnx.ModelProto, path: Path, wanted: list[str],
                     rounded: dict[str, np.ndarray]):
    """A session of `graph` (the model at `path`) with `rounded` in place of those weights
    (main-graph initializers and Constant nodes) and the activations `wanted` added to its
    outputs; and the names of `rounded` it could not place."""
    model = onnx.ModelProto()
    model.CopyFrom(graph)
    expose(model, wanted)
    placed = set()
    tensors = [(t, t.name) for t in model.graph.initializer]
    tensors += [(a.t, node.output[0]) for node in model.graph.node if node.op_type == "Constant"
                for a in node.attribute if a.name == "value"]
    for tensor, name in tensors:
        if name in rounded:
            value = rounded[name].astype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
            tensor.CopyFrom(onnx.numpy_helper.from_array(value, tensor.name))
            placed.add(name)
    return model_session(model, path), sorted(set(rounded) - placed)


Rounder = Callable[[list[str]], dict[str, np.ndarray]]
"""Rounds the named tensors as the run writes them; their values (float32, as decoded)."""


def in_order(path: Path, graph: onnx.ModelProto, calibration: Path,
             tensors: dict[str, TensorInfo], changed: list[str], ordered: set[str],
             round_tensors: Rounder) -> list[str]:
    """Sequential calibration of the tensors among `ordered` (of `changed`, all that the run
    changes) that have second moments: segment by segment, the layers that qualify get (H~, S) in
    `tensors` (updated in place) from the model with everything rounded so far, then the
    segment is rounded by `round_tensors`; every changed tensor that is no such layer (Gather
    tables and Conv weights included) is rounded first. What follows the last segment with
    a layer that qualifies is left to the caller.
    Notes for the report."""
    inputs = {i.name for i in graph.graph.input}
    layers = {name: layer for name, layer in layer_inputs(
        graph, {n: tensors[n].shape for n in changed
                if n in ordered and has_second_moments(tensors[n])}).items()
        if layer.uses[0].conv is None and layer.uses[0].activation not in inputs}
    if not layers:
        return []
    takers = {n for n, layer in layers.items()
              if eligible(layer.k, tensors[n].input_stats.samples)}
    if not takers:
        return [f"--calibration: sequential: no MatMul/Gemm layer has {ROWS_PER_INPUT} input "
                "rows per input; each is rounded on the original model's inputs"]
    parts = segments(graph, layers)
    last = max(i for i, part in enumerate(parts) if takers.intersection(part))
    others = [n for n in changed if n not in layers]
    held = 4 * sum(tensors[n].size for n in others + sum(parts[:last], []))
    if held > MAX_HELD_BYTES:
        return [f"--calibration: sequential: not done (the rounded weights it would hold as "
                f"float32 come to {held >> 20} MiB, over {MAX_HELD_BYTES >> 20} MiB); each "
                "layer is rounded on the original model's inputs"]
    feeds = load_inputs(graph, calibration)
    rounded = round_tensors(others) if others else {}
    moved, runs, missing = 0, 0, []
    for index, part in enumerate(parts[:last + 1]):
        mine = {n: layers[n] for n in part if n in takers}
        if rounded and mine:
            found, missing = shifted_moments(path, calibration, feeds, mine, rounded)
            for name, (h, shift) in found.items():
                tensors[name].input_stats.second_moments.release()
                stats = replace(tensors[name].input_stats, second_moments=SecondMoments.once(h),
                                shift=SecondMoments.once(shift))
                tensors[name] = replace(tensors[name], input_stats=stats)
            moved, runs = moved + len(found), runs + 1
        if index < last:
            rounded.update(round_tensors(part))
    rest = "" if moved == len(layers) else (
        f"; the others have fewer than {ROWS_PER_INPUT} input rows per input, or read only what "
        "nothing rounded changes")
    notes = [f"--calibration: sequential: {moved} of {len(layers)} layers rounded towards the "
             f"original model's outputs on the inputs that the model with the layers before "
             f"them rounded gives ({runs} runs{rest})"]
    if missing:
        notes.append(f"--calibration: sequential: {len(missing)} rounded tensors (in subgraphs) "
                     f"are as in the original in the model the later layers' inputs come from, "
                     f"e.g. {missing[0]!r}")
    return notes

