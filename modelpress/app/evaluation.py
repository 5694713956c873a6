"""Run the original model once, then compare compressed models against it.

Uses `modelpress.formats.onnx.run` (onnxruntime, CPU) to run models and `evaluate` to
compare outputs. A model onnxruntime cannot run becomes a note on the
Evaluation, never an exception; bad input or label files raise InputDataError.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from modelpress.app.environment import package_version
from modelpress.core.errors import InputDataError, ModelRunError
from modelpress.core.evaluate import (SAFETENSORS_NOTE, Accuracy, Evaluation, Latency, compare_outputs, correct_count, label_output)


@dataclass(frozen=True)
class EvalSettings:
    """What to feed both models and how long to time them.

    `inputs` is an .npz of arrays by input name (several samples along the
    batch axis); without it, deterministic random inputs are made from the
    input signature, with `dims` for symbolic dimensions and `ranges` [low,
    high) per input. `labels` (.npy) adds accuracy before and after.
    """

    inputs: Path | None = None
    labels: Path | None = None
    dims: Mapping[str, int] = field(default_factory=dict)
    ranges: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    seed: int = 0
    max_runs: int = 20
    time_budget_s: float = 1.0
    max_input_bytes: int | None = None  # None: formats.onnx.run.MAX_INPUT_BYTES


class Baseline:
    """The original model's outputs and run time on the evaluation inputs."""

    def __init__(self, status: str, notes: list[str], feeds: Any = None,
                 labels: np.ndarray | None = None, outputs: dict[str, np.ndarray] | None = None,
                 times: list[float] | None = None, inputs: dict[str, Any] | None = None,
                 settings: EvalSettings = EvalSettings(), label_name: str | None = None) -> None:
        self.status, self.notes, self.feeds, self.labels = status, notes, feeds, labels
        self.outputs, self.times, self.inputs = outputs, times, inputs or {}
        self.settings, self.label_name = settings, label_name
        self.src: Path | None = None    # the original model, timed beside each compressed one

    @classmethod
    def prepare(cls, src: str | os.PathLike, settings: EvalSettings = EvalSettings()) -> Baseline:
        """Make the inputs and run the original model; raise only for bad input files."""
        src = Path(src)
        if src.suffix.lower() != ".onnx":
            return cls("not-applicable", [SAFETENSORS_NOTE], settings=settings)
        onnx_run = _onnx_run()
        try:
            graph = onnx_run.load_graph(src)
        except ModelRunError as exc:
            return cls("failed", [f"output error not measured: {exc}"], settings=settings)
        limit = {} if settings.max_input_bytes is None else {
            "max_bytes": settings.max_input_bytes}
        if settings.inputs is not None:
            feeds = onnx_run.load_inputs(graph, settings.inputs, **limit)
            described = {"source": str(settings.inputs)}
        else:
            try:
                feeds = onnx_run.random_inputs(graph, settings.dims, settings.ranges, settings.seed,
                                               **limit)
            except ModelRunError as exc:  # e.g. a bf16 input: measure nothing, compress anyway
                return cls("failed", [f"output error not measured: {exc}"], settings=settings)
            described = {"source": "random", "seed": settings.seed}
        described["arrays"] = onnx_run.describe_feeds(feeds)
        labels = None
        if settings.labels is not None:
            labels = onnx_run.load_labels(settings.labels, **limit)
            _check_label_count(labels, feeds, settings)
        if not onnx_run.onnxruntime_available():
            return cls("unavailable", ["output error not measured: onnxruntime is not installed "
                                       f"({onnx_run.INSTALL_HINT})"], feeds, labels,
                       inputs=described, settings=settings)
        try:
            outputs = onnx_run.Session(src).run(feeds)
        except ModelRunError as exc:
            note = f"output error not measured: {exc}"
            if settings.inputs is None:
                note += "; " + onnx_run.made_up_hint(graph, feeds, settings.dims)
            return cls("failed", [note], feeds, labels, inputs=described, settings=settings)
        label_name = None
        if labels is not None:
            shapes = {name: tuple(a.shape) for name, a in outputs.items()}
            label_name = label_output(shapes, labels, str(settings.labels))
            _check_label_range(labels, shapes[label_name][-1], label_name, settings)
        baseline = cls("ok", [], feeds, labels, outputs, None, described, settings, label_name)
        baseline.src = src
        return baseline

    @property
    def runtime(self) -> str | None:
        version = package_version("onnxruntime")
        return None if version is None else f"onnxruntime {version} CPU"

    @property
    def accuracy(self) -> float | None:
        """The original model's accuracy on the labels, when it ran and labels were given."""
        if self.status != "ok" or self.labels is None or self.label_name is None:
            return None
        return correct_count(self.outputs[self.label_name], self.labels) / self.labels.size

    def describe(self) -> Evaluation:
        """The baseline alone: status, runtime, inputs and notes (no comparison)."""
        return Evaluation(self.status, self.runtime, self.inputs, notes=list(self.notes))

    def evaluate(self, path: str | os.PathLike) -> Evaluation:
        """Run the model at `path` on the same inputs and compare it with the original."""
        if self.status != "ok":
            return Evaluation(self.status, self.runtime, self.inputs, notes=list(self.notes))
        onnx_run = _onnx_run()
        try:
            session = onnx_run.Session(Path(path))
            outputs = session.run(self.feeds)
            rows = compare_outputs(self.outputs, outputs)
            # Original and compressed alternate, so a busy machine slows both alike.
            before, after = onnx_run.interleaved_times(
                onnx_run.Session(self.src), session, self.feeds, self.settings.max_runs,
                2 * self.settings.time_budget_s)
        except (ModelRunError, ValueError) as exc:
            return Evaluation("failed", self.runtime, self.inputs,
                              notes=[f"output error not measured for the compressed model: {exc}"])
        accuracy = None
        if self.labels is not None and self.label_name is not None:
            accuracy = Accuracy(self.label_name, int(self.labels.size),
                                correct_count(self.outputs[self.label_name], self.labels),
                                correct_count(outputs[self.label_name], self.labels))
        latency = Latency(onnx_run.median_ms(before), onnx_run.median_ms(after),
                          len(before), len(after), onnx_run.quartiles_ms(before),
                          onnx_run.quartiles_ms(after))
        return Evaluation("ok", self.runtime, self.inputs, rows, accuracy, latency,
                          list(self.notes) + _meaning_changed(rows))


def evaluate(src: str | os.PathLike, dst: str | os.PathLike,
             settings: EvalSettings = EvalSettings()) -> Evaluation:
    """Run the models at `src` and `dst` on the same inputs and compare their outputs."""
    return Baseline.prepare(src, settings).evaluate(dst)


# A relative output error at or past this is no approximation: outputs of zeros score 1.0.
MEANING_CHANGED = 1.0


def _meaning_changed(rows: list[Any]) -> list[str]:
    """A warning when some output is further from the original's than zeros would be."""
    bad = [r for r in rows if not r.error.rel_l2 < MEANING_CHANGED]
    if not bad:
        return []
    worst = max(bad, key=lambda r: r.error.rel_l2 if r.error.rel_l2 == r.error.rel_l2 else 1e300)
    return [f"warning: output {worst.name!r} of the compressed model is no longer the "
            f"original's (relative error {worst.error.rel_l2:.3g}, at or above "
            f"{MEANING_CHANGED:g}: no better than outputs of zeros); check the recipe, or set "
            "--max-output-error to fail such runs"]


def _check_label_range(labels: np.ndarray, classes: int, output: str,
                       settings: EvalSettings) -> None:
    """Refuse a label no class score can match (accuracy would silently count it wrong)."""
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        bad = labels.min() if labels.min() < 0 else labels.max()
        raise InputDataError(f"{settings.labels}: label {int(bad)} is outside the {classes} "
                             f"classes of output {output!r} (0 to {classes - 1})")


def _check_label_count(labels: np.ndarray, feeds: Mapping[str, np.ndarray],
                       settings: EvalSettings) -> None:
    if settings.inputs is None:
        raise InputDataError(f"{settings.labels}: labels need the samples they belong to; "
                             "give --inputs FILE.npz too")
    batch = {a.shape[0] for a in feeds.values() if a.ndim}
    if labels.ndim == 0 or batch and labels.shape[0] not in batch:
        raise InputDataError(f"{settings.labels}: {labels.shape[0] if labels.ndim else 0} labels "
                             f"for {sorted(batch)} samples in {settings.inputs}; give one label "
                             "per sample")


def _onnx_run() -> Any:
    """modelpress.formats.onnx.run, loaded when an ONNX model is first run."""
    # onnx and onnxruntime (about 1 s to import): only when an ONNX model is run
    from modelpress.formats.onnx import run
    return run


def onnx_runner() -> Any:
    """modelpress.formats.onnx.run (it imports onnx), for the application's other modules."""
    return _onnx_run()
