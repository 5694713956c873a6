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
the same activation are one step. The steps are cut into at most MAX_RUNS segments of about
equal count: a segment's layers see the model with every earlier segment's layers rounded
(one run of the calibration data through both models each). A layer gets (H~, S) only when
its inputs have at least ROWS_PER_INPUT rows per input (K): from fewer rows the correction
fits the calibration rows and not the inputs (in a trial on magika's head, 16 rows for 512
inputs, the model's output error went from 0.0433 to 0.0569); the others keep the original
statistics.
The rounded weights are held as float32 while the run lasts: over MAX_HELD_BYTES, it is not
done.
On the sample transformer (9 tensors, 7 layers, 64 x 32 calibration rows; 4 bits) the
output error on its held-out set fell from 0.0456 to 0.0391 (0.623 -> 0.534 of rtn's); at
8 bits from 0.00442 to 0.00406.
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

from modelpress.formats.onnx.calibrate import Layer, layer_inputs
from modelpress.formats.onnx.calibration_run import (chunks, exposing_session, graph_of,
                                                     model_session, run_exposed)
from modelpress.formats.onnx.moments import Sums, matmul_rows, shrunk_moments
from modelpress.formats.onnx.run import load_inputs

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


def eligible(layer: Layer, rows: int) -> bool:
    """Whether a layer with `rows` input rows gets the correction (see ROWS_PER_INPUT)."""
    return rows >= ROWS_PER_INPUT * layer.k


class _Cross:
    """Running sums of X~^T X~ (via `Sums`, for the shrinkage) and X~^T (X - X~)."""

    def __init__(self, layer: Layer) -> None:
        self.sums = Sums(layer.groups, layer.k, True)
        self.cross = np.zeros((layer.groups, layer.k, layer.k))
        self.bad = False

    def add(self, original: np.ndarray, rounded: np.ndarray) -> None:
        if self.bad or original.shape != rounded.shape or not self.sums.add(rounded):
            self.bad = True
            return
        with one_blas_thread():
            self.cross += np.matmul(rounded.transpose(0, 2, 1), original - rounded)

    def result(self) -> tuple[np.ndarray, np.ndarray] | None:
        """(H~, S) as [K, K] (float64); None if some rows did not fit."""
        if self.bad or not self.sums.rows:
            return None
        return shrunk_moments(self.sums)[0], (self.cross / self.sums.rows)[0]


def shifted_moments(path: Path, calibration: Path, feeds: dict[str, np.ndarray],
                    layers: dict[str, Layer], rounded: dict[str, np.ndarray]
                    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(H~, S) for each of `layers` (MatMul/Gemm), from the model at `path` run on the
    calibration feeds as it is and with `rounded` (name -> float32 weight) in place of
    those weights. A layer whose inputs do not fit it is left out."""
    graph = graph_of(path)
    wanted = sorted({u.activation for layer in layers.values() for u in layer.uses})
    sessions = [exposing_session(path, wanted), _rounded_session(graph, path, wanted, rounded)]
    inputs = {i.name for i in graph.graph.input}
    computed = [a for a in wanted if a not in inputs]
    sums = {name: _Cross(layer) for name, layer in layers.items()}
    for chunk in chunks(feeds, calibration, graph):
        values = []
        for session in sessions:
            got = dict(zip(computed, run_exposed(session, computed, chunk, path, calibration)))
            got.update({a: chunk[a] for a in wanted if a in inputs and a in chunk})
            values.append(got)
        for name, layer in layers.items():
            for use in layer.uses:
                pairs = zip(*(_rows(np.asarray(v[use.activation]), layer, use) for v in values))
                for original, moved in pairs:
                    sums[name].add(original, moved)
    found = {name: s.result() for name, s in sums.items()}
    return {name: r for name, r in found.items() if r is not None}


def _rows(value: np.ndarray, layer: Layer, use):
    return matmul_rows(value, layer.k, use.k_first) if value.dtype.kind == "f" else iter(())


def _rounded_session(graph: onnx.ModelProto, path: Path, wanted: list[str],
                     rounded: dict[str, np.ndarray]):
    """A session of `graph` (the model at `path`) with `rounded` in place of those weights
    and the activations `wanted` added to its outputs."""
    model = onnx.ModelProto()
    model.CopyFrom(graph)
    present = {o.name for o in model.graph.output} | {i.name for i in model.graph.input}
    for name in wanted:
        if name not in present:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
    for tensor in model.graph.initializer:
        if tensor.name in rounded:
            value = rounded[tensor.name].astype(onnx.helper.tensor_dtype_to_np_dtype(
                tensor.data_type))
            tensor.CopyFrom(onnx.numpy_helper.from_array(value, tensor.name))
    return model_session(model, path)


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
    layers = {name: layer for name, layer in layer_inputs(
        graph, {n: tensors[n].shape for n in changed
                if n in ordered and has_second_moments(tensors[n])}).items()
        if layer.uses[0].conv is None}
    if not layers:
        return []
    takers = {n for n, layer in layers.items()
              if eligible(layer, tensors[n].input_stats.samples)}
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
    moved, runs = 0, 0
    for index, part in enumerate(parts[:last + 1]):
        mine = {n: layers[n] for n in part if n in takers}
        if rounded and mine:
            found = shifted_moments(path, calibration, feeds, mine, rounded)
            for name, (h, shift) in found.items():
                stats = replace(tensors[name].input_stats, second_moments=SecondMoments.of(h),
                                shift=SecondMoments.of(shift))
                tensors[name] = replace(tensors[name], input_stats=stats)
            moved, runs = moved + len(found), runs + 1
        if index < last:
            rounded.update(round_tensors(part))
    notes = [f"--calibration: sequential: {moved} of {len(layers)} layers rounded towards the "
             f"original model's outputs on the inputs that the model with the layers before "
             f"them rounded gives ({runs} runs; the others have fewer than "
             f"{ROWS_PER_INPUT} input rows per input, or read only what nothing rounded "
             "changes)"]
    return notes

