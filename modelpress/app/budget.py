"""Budgeted compression: choose each tensor's precision so that the output meets a target.

`search` finds the recipe; the run then writes it like any other
(`modelpress.app.api.compress`), and `--print-recipe` prints it instead: it
names every tensor's candidate, so it reruns without a search and writes the
same bytes.

1. The candidates (modelpress.core.candidates) of every tensor the quantize
   stage selects are encoded and measured (modelpress.app.sensitivity).
2. The allocation (modelpress.core.budget) picks one candidate per tensor.
3. The model it makes is written to a scratch folder beside the output and
   measured: its size on disk, and, with inputs, its worst output error on
   them. A size target then corrects its byte budget by what the file holds
   besides those tensors (graph, decode nodes, metadata); an error target
   rescales its error budget by measured over predicted error, within the
   bracket of budgets known to meet or miss it. Up to MAX_PROBES models are
   measured; the smallest that meets every target wins, or BudgetError says
   what was reached.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from modelpress.core.budget import (Allocation, BudgetError, Option, Target, allocate_error,
                                    allocate_size, smallest, totals)
from modelpress.core.candidates import KEPT, Choices, choices_for
from modelpress.core.errors import InputDataError, ModelReadError, RecipeError
from modelpress.core.pipeline import Options, encode_stream, plan
from modelpress.core.recipe import Recipe
from modelpress.core.store import Progress, TensorStore, WriteOptions
from modelpress.formats import open_model
from modelpress.formats.safetensors.ct_config import for_loaders as loader_recipe
from modelpress.formats.safetensors.ct_config import loader_form

from modelpress.app.evaluation import onnx_runner
from modelpress.app.sensitivity import OutputProbe, Sensitivity, runner_probe

MAX_PROBES = 8
# What compressed-tensors' pack-quantized layout holds (formats.safetensors.layout).
LOADER_WIDTHS = (4, 8)
# An error target aims this far under the target on the search's inputs (inputs of the
# same kind then meet it too, most of the time).
ERROR_AIM = 0.9
# Models larger than this are not run with their weights as inputs (a copy is made in
# memory): their tensors' errors are estimated from the weights.
VARIANT_MAX_BYTES = 1 << 30
# First guess of what an output holds besides the chosen tensors' bytes (graph, decode
# nodes, metadata); the first measured model replaces it.
OVERHEAD_GUESS = {"onnx": (8192, 512), "safetensors": (0, 256)}


@dataclass
class Measured:
    """One model tried: its file size and worst output error on the search's inputs."""

    file_bytes: int
    error: float | None


@dataclass
class Outcome:
    """What the search found: the recipe to write, and what it meets."""

    recipe: Recipe
    chosen: dict[str, str]            # tensor -> candidate label, file order
    target: Target
    limit: int | None                 # the size target in bytes
    file_bytes: int
    error: float | None               # worst output error on the search's inputs
    predicted: float | None           # the allocation's predicted error
    inputs: str | None                # what the error was measured on
    measured_pairs: int               # (tensor, candidate) errors measured by running
    pairs: int
    probes: int
    notes: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Tensors per candidate label, in candidate order."""
        found: dict[str, int] = {}
        for label in self.chosen.values():
            found[label] = found.get(label, 0) + 1
        return found

    def as_dict(self) -> dict[str, Any]:
        """JSON-safe, for --report."""
        return {"target_size": self.limit, "target_error": self.target.error,
                "file_bytes": self.file_bytes, "error": _finite(self.error),
                "predicted_error": _finite(self.predicted), "measured_on": self.inputs,
                "errors_measured": self.measured_pairs, "candidates": self.pairs,
                "models_tried": self.probes, "counts": self.counts(),
                "chosen": dict(self.chosen)}


def search(src: str | os.PathLike, dst: str | os.PathLike, recipe: Recipe | None,
           target: Target, *, widths: Sequence[int] | None = None,
           inputs: str | os.PathLike | None = None, calibration: bool = False,
           options: Options = Options(), writer: WriteOptions | None = None,
           progress: Progress | None = None, for_loaders: bool = False) -> Outcome:
    """The recipe that meets `target` on the model at `src`, to be written to `dst`.

    `recipe`: the stages given (None: a quantize stage alone); `widths`: the
    bit widths to choose from (None: see modelpress.core.candidates).
    `inputs`: an .npz of model inputs (ONNX) the error is measured on; with
    `calibration`, they are also the calibration data (statistics for the
    quantize stage, as `api.compress(calibration=...)` computes them).
    `writer`: the format's writer settings. `for_loaders`: the model is the
    weights of a Hugging Face model directory (see `api.compress`): the
    candidates are then what its loaders take (4 and 8 bits in
    compressed-tensors' layout, or kept), embeddings stay dense. Nothing is
    written at `dst`.
    """
    src, dst = Path(src), Path(dst)
    store = open_model(src)
    if store.encodings:
        raise ModelReadError(f"{src}: already compressed by modelpress; run `modelpress "
                             "decompress` on it first")
    if target.error is not None and (store.format != "onnx" or inputs is None):
        raise InputDataError(f"{src}: --target-error needs an ONNX model and inputs to run it "
                             "on (--calibration FILE.npz)")
    choices = choices_for(recipe, widths)
    if for_loaders and store.format == "safetensors":
        choices = _for_loaders(choices, store, widths, options)
    else:
        for_loaders = False
    names = [name for name, stages in plan(store, choices.recipe, options).items()
             if any(stage is choices.chooser for stage in stages)]
    if not names:
        raise BudgetError(f"{src}: the quantize stage selects no tensor, so a target has "
                          "nothing to choose (see `modelpress inspect`)")
    if calibration and inputs is not None:
        store.calibrate(Path(inputs), set(names))
    folder = dst.parent if dst.parent.is_dir() else None
    with tempfile.TemporaryDirectory(prefix=".modelpress-target-", dir=folder) as work:
        probe, notes = _probe(store, names, inputs, Path(work))
        measure = Sensitivity(store, choices, names, options, probe)
        measure.sweep(progress)
        measure.table.notes.extend(notes)
        trial = _Trial(measure, writer, Path(work) / dst.name, for_loaders)
        outcome = settle(trial, target)
    outcome.inputs = None if inputs is None else str(inputs)
    return outcome


def _for_loaders(choices: Choices, store: TensorStore, widths: Sequence[int] | None,
                 options: Options) -> Choices:
    """The choices a Hugging Face model directory's loaders take: 4 and 8 bits
    (pack-quantized) or kept, embeddings left out (`ct_config.for_loaders`)."""
    given = widths if widths is not None else [c.stage.bits for c in choices.candidates
                                               if c.label.startswith("int")]
    usable = [bits for bits in given if bits in LOADER_WIDTHS]
    if not usable:
        raise RecipeError(f"quantize --bits {'/'.join(map(str, given))}: a Hugging Face model "
                          "directory loads 4 and 8 bits (compressed-tensors); choose from "
                          "them (--bits 4-8)")
    applied, _ = loader_recipe(choices.recipe, store.tensors, options.min_elements)
    return choices_for(applied, usable, float16=False)


def _probe(store: TensorStore, names: list[str], inputs: str | os.PathLike | None,
           work: Path) -> tuple[OutputProbe | None, list[str]]:
    """The original model's outputs on `inputs` (and a session to run weight variants in,
    for a model small enough), or None without inputs or for safetensors."""
    if inputs is None or store.format != "onnx":
        return None, []
    run = onnx_runner()
    feeds = run.load_inputs(run.load_graph(store.path), Path(inputs))
    reference = run.Session(store.path).run(feeds)
    if store.file_bytes > VARIANT_MAX_BYTES:
        return OutputProbe(feeds, reference), [
            "target: per-tensor output errors not measured (model over "
            f"{VARIANT_MAX_BYTES >> 20} MiB); estimated from weight errors"]
    return runner_probe(run, store.path, store, names, feeds, reference, work)


class _Trial:
    """Allocates (measuring the errors an allocation relies on first, while runs are left),
    writes an allocation's model to the scratch folder and measures it."""

    def __init__(self, measure: Sensitivity, writer: WriteOptions | None, path: Path,
                 for_loaders: bool = False) -> None:
        self.measure, self.table, self.store = measure, measure.table, measure.store
        self.writer, self.path, self.for_loaders = writer, path, for_loaders
        self.options = self.table.options()
        self.tried: dict[tuple[int, ...], Measured] = {}

    def allocate(self, rule: Callable[[list[list[Option]]], Allocation | None]
                 ) -> Allocation | None:
        """`rule`'s allocation, after the errors it relies on were measured (if runs remain)."""
        while True:
            chosen = rule(self.options)
            if chosen is None or not self.measure.measure(self.table.unmeasured(chosen)):
                return chosen
            self.options = self.table.options()

    def recipe(self, chosen: Allocation) -> Recipe:
        labels = {name: self.table.labels[i] for name, i in zip(self.table.names, chosen)}
        return self.measure.choices.final_recipe(labels, list(self.store.tensors))

    def __call__(self, chosen: Allocation) -> Measured:
        key = tuple(chosen)
        if key not in self.tried:
            recipe = self.recipe(chosen)
            stream = encode_stream(self.store, recipe, self.measure.options)
            stored = ((name, loader_form(e)) for name, e in stream) if self.for_loaders \
                else stream
            try:
                result = self.store.write(self.path, stored, options=self.writer)
            finally:
                stream.close()
            probe, error = self.measure.probe, None
            if probe is not None:
                error = probe.worst(onnx_runner().Session(self.path).run(probe.feeds))
            self.tried[key] = Measured(result.file_bytes, error)
        return self.tried[key]

    def uniform(self) -> list[Allocation]:
        """Every tensor at the same candidate, for each candidate, smallest first."""
        count = len(self.table.labels)
        found = [[i] * len(self.options) for i in range(count)]
        return sorted(found, key=lambda c: totals(self.options, c)[0])


def settle(trial: _Trial, target: Target) -> Outcome:
    """Allocate, measure and correct until `target` holds (see the module doc)."""
    store = trial.store
    limit = None if target.size is None else target.size.resolve(store.file_bytes)
    found: list[tuple[Allocation, Measured]] = []
    if limit is not None:
        found += _fit_size(trial, limit)
    if target.error is not None:
        found += _fit_error(trial, target.error, limit)
    found += _uniform(trial, target, limit, found)
    good = [(c, m) for c, m in found if _meets(m, target, limit)]
    if not good:
        raise BudgetError(_missed(trial, target, limit, found))
    if target.error is None:  # the least error within the size: measured where it was
        chosen, measured = min(good, key=lambda cm: (
            cm[1].error if cm[1].error is not None else totals(trial.options, cm[0])[1],
            cm[1].file_bytes))
    else:
        chosen, measured = min(good, key=lambda cm: (cm[1].file_bytes, cm[1].error))
    labels = {name: trial.table.labels[i] for name, i in zip(trial.table.names, chosen)}
    if not trial.recipe(chosen).stages:
        raise BudgetError(f"{store.path}: the target is met only by the model as it is "
                          f"({measured.file_bytes} bytes): nothing to compress")
    return Outcome(trial.recipe(chosen), labels, target, limit, measured.file_bytes,
                   measured.error, math.sqrt(totals(trial.options, chosen)[1]), None,
                   len(trial.table.measured), trial.table.pairs, len(trial.tried),
                   list(trial.table.notes))


def _meets(measured: Measured, target: Target, limit: int | None) -> bool:
    if limit is not None and measured.file_bytes > limit:
        return False
    return target.error is None or (measured.error is not None and
                                    measured.error <= target.error)


def _fit_size(trial: _Trial, limit: int) -> list[tuple[Allocation, Measured]]:
    """Allocations for the size `limit`, measured; the byte budget of the chosen tensors is
    corrected by the other bytes each measured file holds."""
    options, store = trial.options, trial.store
    fixed, per_tensor = OVERHEAD_GUESS.get(store.format, (0, 0))
    rest = store.file_bytes - sum(store.tensors[n].nbytes for n in trial.table.names)
    other = rest + fixed + per_tensor * len(options)
    floor = totals(options, smallest(options))[0]
    if floor + rest > limit:
        raise BudgetError(_too_small(trial, limit, floor + rest))
    found: list[tuple[Allocation, Measured]] = []
    seen: list[int] = []
    for _ in range(MAX_PROBES):
        budget = limit - (max(seen) if seen else other)
        chosen = trial.allocate(lambda opts: allocate_size(opts, budget))
        if chosen is None or tuple(chosen) in trial.tried:
            break
        measured = trial(chosen)
        found.append((chosen, measured))
        seen.append(measured.file_bytes - totals(trial.options, chosen)[0])
    if not any(m.file_bytes <= limit for _, m in found):
        raise BudgetError(_too_small(trial, limit, floor + max(seen, default=other)))
    return found


def _fit_error(trial: _Trial, error: float, limit: int | None
               ) -> list[tuple[Allocation, Measured]]:
    """Allocations for the error target, measured: the error budget follows measured over
    predicted error, kept inside the bracket of budgets known to meet (good) or miss it."""
    aim = error * ERROR_AIM
    budget, good, bad = aim * aim, 0.0, math.inf
    found: list[tuple[Allocation, Measured]] = []
    for _ in range(MAX_PROBES):
        chosen = trial.allocate(lambda opts: allocate_error(opts, budget))
        if tuple(chosen) in trial.tried and found:
            break
        measured = trial(chosen)
        found.append((chosen, measured))
        predicted = totals(trial.options, chosen)[1]
        if measured.error is not None and measured.error <= error and (
                limit is None or measured.file_bytes <= limit):
            good = max(good, budget)
        else:
            bad = min(bad, budget)
        if predicted > 0 and measured.error:
            following = budget * (aim / measured.error) ** 2
        else:
            following = budget * 4 if measured.error is not None and measured.error < aim \
                else budget / 4
        if not good < following < bad:
            following = math.sqrt(good * bad) if good > 0 and bad < math.inf else (
                bad / 4 if good == 0 else good * 4)
        if bad < math.inf and good > 0 and bad / good < 1.05:
            break
        budget = following
    if not any(m.error is not None and m.error <= error for _, m in found):
        best = [min(range(len(o)), key=lambda i: (o[i].err2, o[i].nbytes)) for o in trial.options]
        found.append((best, trial(best)))
    return found


def _uniform(trial: _Trial, target: Target, limit: int | None,
             found: list[tuple[Allocation, Measured]]) -> list[tuple[Allocation, Measured]]:
    """The uniform allocations that could beat what the search found, measured: for a size,
    the largest that fits it; for an error, each smaller than the best model found, largest
    first, while they meet it. The search never returns worse than one candidate for all."""
    best = [m for _, m in found if _meets(m, target, limit)]
    checked: list[tuple[Allocation, Measured]] = []
    other = max((m.file_bytes - totals(trial.options, c)[0] for c, m in found), default=0)
    for chosen in reversed(trial.uniform()):
        size = totals(trial.options, chosen)[0] + other
        if limit is not None and size > limit:
            continue
        if target.error is not None and best and size >= min(m.file_bytes for m in best):
            continue
        measured = trial(chosen)
        checked.append((chosen, measured))
        if target.error is None:
            if measured.file_bytes <= limit:
                break
        elif not _meets(measured, target, limit):
            break
    return checked


def _too_small(trial: _Trial, limit: int, least: int) -> str:
    table = trial.table
    labels = {table.labels[i] for i in smallest(trial.options)}
    return (f"--target-size {limit} bytes is below the smallest model the candidates make "
            f"(at least {least} bytes, every chosen tensor at {'/'.join(sorted(labels))}); give "
            "a larger target or allow fewer bits (--bits 2-8)")


def _missed(trial: _Trial, target: Target, limit: int | None,
            found: list[tuple[Allocation, Measured]]) -> str:
    """One line: which target was missed and the closest model the search measured."""
    def worst(m: Measured) -> float:
        return m.error if m.error is not None else math.inf
    within = [m for _, m in found if limit is None or m.file_bytes <= limit]
    closest = min(within or [m for _, m in found], key=lambda m: (worst(m), m.file_bytes))
    wanted = [f"--target-error {target.error:g}"] if target.error is not None else []
    wanted += [f"--target-size {limit} bytes"] if limit is not None else []
    kept = [m for c, m in found if all(trial.table.labels[i] == KEPT for i in c)]
    floor = f"; with every tensor kept its error is {kept[0].error:.4g} (from the other stages)" \
        if kept and kept[0].error else ""
    return (f"{' and '.join(wanted)} not reached: the closest of {len(trial.tried)} models "
            f"measured has output error {worst(closest):.4g} at {closest.file_bytes} bytes"
            f"{floor}; relax a target")


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None

