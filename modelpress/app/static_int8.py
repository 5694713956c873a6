"""`quantize --activations int8`: static int8 (QDQ) that onnxruntime runs as integer kernels.

The run: the float model as onnxruntime's basic passes leave it (batch norms
folded), its activations' ranges over the --calibration inputs, the choice of
which activations stay float and of each one's range method by measured output
error (`keep_float`), then by measured speed (`speed`: integer nodes timed
slower than float go back to float within the error target; float nodes keep
int8 weights in a form onnxruntime folds at load), the QDQ model
(modelpress.formats.onnx.qdq) written atomically, and onnxruntime's optimized
graph read back to count the integer kernels and name each float
Conv/MatMul/Gemm with the reason it stayed float.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from modelpress.core.activation_ranges import METHODS, ActivationRange, ranges

from modelpress.core.errors import ModelReadError, RecipeError
from modelpress.core.histogram import Histogram
from modelpress.core.metrics import compare
from modelpress.core.quantize.static import DEFAULT_ERROR, layout_notes, static_stage
from modelpress.core.recipe import Recipe
from modelpress.core.report import Report, TensorRow
from modelpress.core.store import Progress
from modelpress.formats import check_output_path, open_model
from modelpress.formats.onnx.activation_stats import collect, collect_stats
from modelpress.formats.onnx.fake_quant import FakeQuantRunner, worst_error
from modelpress.formats.onnx.feeds import load_inputs
from modelpress.formats.onnx.graph import opset_version
from modelpress.formats.onnx.kernels import float_graph, optimized_kernels
from modelpress.formats.onnx.qdq import (QdqResult, build, fake_weights, name_nodes,
                                         quantized_groups)
from modelpress.formats.onnx.qdq_sites import Sites, find_sites, float_tensors
from modelpress.formats.onnx.run import Session
from modelpress.formats.onnx.smooth import sites as smooth_sites
from modelpress.formats.onnx.smooth import smooth
from modelpress.formats.onnx.write import PROTOBUF_LIMIT, save_model, staged

from modelpress.app.keep_float import Choice, Measure, choose, confirm, float_weights
from modelpress.app.speed import Speed, measure_speed, untimed

MIN_OPSET = 13  # per-axis DequantizeLinear
PROFILE_SAMPLES = 1
"""Calibration samples per profiled run when timing integer against float nodes."""
SMOOTH_ALPHA = 0.5
"""SmoothQuant's migration strength (the paper's default for most models)."""


def compress_static(src: str | os.PathLike, dst: str | os.PathLike, recipe: Recipe,
                    calibration: str | os.PathLike, *, target_error: float | None = None,
                    external_data: str = "auto", progress: Progress | None = None,
                    time_kernels: bool = True) -> Report:
    """Write `src` as static int8 QDQ to `dst` (see the module's docstring); the report's
    `static_int8` holds the search, the activation counts and onnxruntime's kernels.
    `time_kernels`: put integer nodes timed slower than their float form on this machine
    back to float (within the error target); False decides by output error alone, so the
    file does not depend on timings."""
    src, dst, calibration = Path(src), Path(dst), Path(calibration)
    stage = static_stage(recipe.stages)
    if stage is None:
        raise RecipeError("the recipe has no quantize --activations int8 stage")
    store = open_model(src)
    if store.format != "onnx":
        raise RecipeError(f"{src}: quantize --activations int8 needs an ONNX model")
    check_output_path(store, dst)
    if store.encodings:
        raise ModelReadError(f"{src}: already compressed by modelpress; run `modelpress "
                             "decompress` on it first")
    if store.file_bytes > PROTOBUF_LIMIT:
        raise ModelReadError(f"{src}: {store.file_bytes} bytes; static int8 takes models under "
                             "2 GB (protobuf's limit), it rewrites the graph in memory")
    model, folded = float_graph(src)
    name_nodes(model)
    if opset_version(model) < MIN_OPSET:
        raise ModelReadError(f"{src}: opset {opset_version(model)}; static int8 needs opset "
                             f"{MIN_OPSET} or later (per-channel DequantizeLinear); convert it "
                             "with onnx.version_converter first")
    target = DEFAULT_ERROR if target_error is None else target_error
    feeds = load_inputs(model, calibration)
    reference = Session(src).run(feeds)
    sites = find_sites(model, float_tensors(model))
    groups = list(sites.groups)
    with tempfile.TemporaryDirectory(prefix="modelpress-static-") as tmp:
        variant = None
        for label, candidate_model, smooth_notes in _variants(model, Path(tmp), calibration):
            prepared = Path(tmp) / f"float{label}.onnx"
            onnx.save(candidate_model, str(prepared))
            candidates = _candidates(prepared, candidate_model, calibration, sites)
            simulated = fake_weights(candidate_model)
            onnx.save(simulated, str(prepared))
            measure = _measure(FakeQuantRunner(prepared, simulated, sites.tensors, feeds,
                                               calibration=calibration),
                               reference, candidate_model, sites, candidates)
            error = min(measure(frozenset(), {g: m for g in groups}) for m in METHODS)
            if variant is None or error < variant[0]:
                variant = (error, candidate_model, smooth_notes, candidates, measure)
        _, model, smooth_notes, candidates, measure = variant
        name_nodes(model)
        choice = choose(groups, {g: list(c) for g, c in candidates.items()}, measure, target,
                        _ticker(progress))
        speed = measure_speed(model, sites, {g: candidates[g][m] for g, m in
                                             choice.methods.items()}, set(choice.keep),
                              {k: v[:PROFILE_SAMPLES] for k, v in feeds.items()}, Path(tmp)) \
            if time_kernels else untimed(model)
        slow = float_for_speed(speed, choice, measure, target) if time_kernels else frozenset()
        forms = (slow, frozenset(speed.weight_only))
        result, size, measured = _write(model, sites, candidates, choice, forms, src, dst,
                                        feeds, reference, external_data)
        if measured > target:
            confirm(choice, _written_error(model, sites, candidates, forms, feeds, reference,
                                           Path(tmp)), measured, target)
            result, size, measured = _write(model, sites, candidates, choice, forms, src, dst,
                                            feeds, reference, external_data)
        if measured > target and forms[1]:
            written = _written_error(model, sites, candidates, forms, feeds, reference, Path(tmp))
            kept, _ = float_weights(sorted(forms[1]), measured, target, lambda int8: written(
                frozenset(choice.keep), choice.methods, int8), choice.counter)
            if kept != forms[1]:
                forms = (slow, kept)
                result, size, measured = _write(model, sites, candidates, choice, forms, src,
                                                dst, feeds, reference, external_data)
    kernels = optimized_kernels(dst)
    notes = layout_notes(stage) + smooth_notes + _notes(folded, sites, choice, measured,
                                                        target_error is None) + \
        _speed_notes(speed, slow, result)
    report = Report(input_path=str(src), output_path=str(dst), format="onnx",
                    recipe=recipe.get_config(), rows=_rows(model, result),
                    file_bytes_before=store.file_bytes, file_bytes_after=size, notes=notes,
                    applied=recipe.get_config())
    report.static_int8 = {
        "activations": {"groups": len(sites.groups), "tensors": len(sites.tensors),
                        "kept_float": list(choice.keep)},
        "search": {**choice.as_dict(), "error_written": measured, "met": measured <= target},
        "nodes": {"integer": list(result.integer), "float": dict(result.float_reasons),
                  "weight_only": list(result.weight_only)},
        "speed": {**speed.as_dict(), "kept_float_for_speed": sorted(slow)},
        "kernels": {**kernels.as_dict(), "float_reasons": {
            name: _reason(name, result.float_reasons) for name in kernels.float_nodes}}}
    return report


def _variants(model: onnx.ModelProto, tmp: Path,
              calibration: Path) -> Iterator[tuple[str, onnx.ModelProto, list[str]]]:
    """The float model, and when it has MatMul/Gemm inputs that SmoothQuant can act on, the
    model smoothed (alpha SMOOTH_ALPHA): the search continues on whichever int8 hurts less."""
    yield "", model, []
    found, _ = smooth_sites(model)
    if not found:
        return
    path = tmp / "float-channels.onnx"
    onnx.save(model, str(path))
    stats = collect_stats(path, model, calibration, [], channels=[s.activation for s in found])
    smoothed, notes = smooth(model, stats.absmax, SMOOTH_ALPHA)
    yield "-smoothed", smoothed, [f"static int8: {note}" for note in notes[:1]]


def float_for_speed(speed: Speed, choice: Choice, measure: Measure,
                     target: float) -> frozenset[str]:
    """The integer nodes measured slower than float (largest loss first) that stay float,
    each one only if the simulated error stays within the target (or does not grow)."""
    slow: frozenset[str] = frozenset()
    for name in speed.slow:
        found = measure(frozenset(choice.keep), choice.methods, slow | {name})
        choice.counter[0] += 1
        choice.steps.append((f"float for speed {name}", found))
        if found <= max(target, choice.error):
            slow, choice.error = slow | {name}, found
    return slow


def _write(model: onnx.ModelProto, sites: Sites,
           candidates: Mapping[str, Mapping[str, ActivationRange]], choice: Choice,
           forms: tuple[frozenset[str], frozenset[str]], src: Path, dst: Path,
           feeds: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray],
           external_data: str) -> tuple[QdqResult, int, float]:
    """Build and write the QDQ model of `choice` with `forms` (the nodes kept float for
    speed, the float nodes with int8 weights); with its size and measured error."""
    result = build(model, sites, {g: candidates[g][m] for g, m in choice.methods.items()},
                   set(choice.keep), *forms)
    with staged(dst) as staging:
        size = save_model(result.model, dst, staging, src, external_data)
    return result, size, worst_error(reference, Session(dst).run(feeds))


def _reason(name: str, reasons: Mapping[str, str]) -> str:
    """Why an optimized graph's float node stayed float: its own reason, or that of the node
    onnxruntime renamed it from (it appends suffixes such as `_nchwc`)."""
    if name in reasons:
        return reasons[name]
    source = max((n for n in reasons if name.startswith(n)), key=len, default=None)
    return reasons[source] if source else "onnxruntime did not fuse it"


def _written_error(model: onnx.ModelProto, sites: Sites,
                   candidates: Mapping[str, Mapping[str, ActivationRange]],
                   forms: tuple[frozenset[str], frozenset[str]],
                   feeds: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray],
                   tmp: Path) -> Measure:
    """A measurement of the QDQ model itself (a new session per run: slower than the
    simulation, exact); `int8_weights` replaces the float nodes that store int8 weights."""
    def measure(keep: frozenset[str], methods: Mapping[str, str],
                int8_weights: frozenset[str] | None = None) -> float:
        result = build(model, sites, {g: candidates[g][m] for g, m in methods.items()},
                       set(keep), forms[0], forms[1] if int8_weights is None else int8_weights)
        path = tmp / "trial.onnx"
        onnx.save(result.model, str(path))
        return worst_error(reference, Session(path).run(feeds))
    return measure


def _candidates(path: Path, model: onnx.ModelProto, calibration: Path,
                sites: Sites) -> dict[str, dict[str, ActivationRange]]:
    """Each site group's uint8 range per method, from its members' histograms together."""
    hists = collect(path, model, calibration, sites.tensors)
    out = {}
    for group, members in sites.groups.items():
        hist = Histogram(hists[members[0]].bins, group)
        for name in members:
            hist.merge(hists[name])
        out[group] = ranges(hist)
    return out


def _measure(runner: FakeQuantRunner, reference: Mapping[str, np.ndarray], model: onnx.ModelProto,
             sites: Sites, candidates: Mapping[str, Mapping[str, ActivationRange]]) -> Measure:
    """The search's measurement: one run of the fake-quantized model (int8 weights, the
    activations `build` would quantize through Q/DQ) on the calibration inputs, its worst
    output error."""
    def measure(keep: frozenset[str], methods: Mapping[str, str],
                slow: frozenset[str] = frozenset()) -> float:
        used = quantized_groups(model, sites, set(keep), slow)
        chosen = {t: None if g not in used else candidates[g][methods[g]]
                  for g, members in sites.groups.items() for t in members}
        return worst_error(reference, runner.outputs(chosen))
    return measure


def _ticker(progress: Progress | None) -> Callable[[int], None]:
    steps = [0]

    def tick(n: int) -> None:
        steps[0] += n
        if progress is not None:
            progress(steps[0], 0, "static int8: measuring")
    return tick


def _rows(model: Any, result: QdqResult) -> list[TensorRow]:
    """One row per int8 weight: bytes before and after, error of the int8 values."""
    inits = {t.name: t for t in model.graph.initializer}
    out_inits = {t.name: t for t in result.model.graph.initializer}
    rows = []
    for name, (before, after) in result.weights.items():
        w = numpy_helper.to_array(inits[name]).astype(np.float32)
        codes_name, scale_name, axis, form = result.stored[name]
        codes = numpy_helper.to_array(out_inits[codes_name]).astype(np.float32)
        scale = numpy_helper.to_array(out_inits[scale_name])
        shape = [1] * w.ndim
        shape[axis] = -1
        rows.append(TensorRow(name=name, shape=tuple(w.shape), dtype="float32",
                              encoding=f"int8 sym channel ({form}, axis {axis})",
                              bytes_before=before, bytes_after=after,
                              error=compare(w, codes * scale.reshape(shape)),
                              stages=[{"id": "quantize", "bits": 8, "activations": "int8",
                                       "scheme": "sym", "granularity": "channel"}]))
    return rows


def _notes(folded: int, sites: Sites, choice: Choice, measured: float,
           default_target: bool) -> list[str]:
    notes = []
    if folded:
        notes.append(f"static int8: {folded} per-channel Sub/Mul/Add/Div after Conv folded "
                     "into its weights and bias (same function)")
    where = "default target" if default_target else "--target-error"
    notes.append(f"static int8: output error on the calibration inputs {measured:.4g} with "
                 f"{len(choice.keep)} of {len(sites.groups)} activation groups kept float "
                 f"({where} {choice.target:g}: {'met' if measured <= choice.target else 'NOT met'}"
                 f"; simulated with int8 weights and fake-quantized activations: "
                 f"{choice.start_error:.4g} all int8, {choice.error:.4g} as written, "
                 f"{choice.runs} runs)")
    if choice.keep:
        notes.append("static int8: kept float: " + ", ".join(choice.keep[:8]) +
                     (f" and {len(choice.keep) - 8} more" if len(choice.keep) > 8 else ""))
    return notes


def _speed_notes(speed: Speed, slow: frozenset[str], result: QdqResult) -> list[str]:
    ms = (speed.total_float_us / 1000, speed.total_int8_us / 1000)
    notes = ["static int8: kernels not timed (--no-time-kernels): integer nodes chosen by "
             "output error alone"] if not speed.timed else [f"static int8: kernel time measured per node (onnxruntime profiles, one thread, "
             f"one calibration sample, interleaved rounds): float {ms[0]:.3g} ms, all chosen "
             f"int8 {ms[1]:.3g} ms; {len(speed.slow)} integer nodes measured slower than "
             f"float, {len(slow)} of them kept float (the others would raise the output "
             "error above the target, or above what it was)"]
    if slow:
        notes.append("static int8: kept float for speed: " + ", ".join(sorted(slow)[:6]) +
                     (f" and {len(slow) - 6} more" if len(slow) > 6 else ""))
    if result.weight_only:
        notes.append(f"static int8: {len(result.weight_only)} float Conv/MatMul/Gemm store "
                     "int8 weights (Cast x scale, folded back to float by onnxruntime at load)")
    if speed.weight_only_slower:
        notes.append("static int8: float weights kept (weight-only int8 measured slower): " +
                     ", ".join(speed.weight_only_slower[:6]))
    return notes
