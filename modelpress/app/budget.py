"""Budgeted compression: choose each tensor's precision so that the output meets a target.

`search_target` finds the recipe; the run then writes it like any other
(`modelpress.app.api.compress`), and `--print-recipe` prints it instead: it
names every tensor's candidate, so it reruns without a search and writes the
same bytes.

1. The candidates (modelpress.core.candidates) of every tensor the quantize
   stage selects are encoded and measured (modelpress.app.sensitivity).
2. The allocation (modelpress.core.budget) picks one candidate per tensor.
3. The model it makes is written to a scratch folder beside the output and
   measured (modelpress.app.trial): its size on disk, and, with inputs, its
   worst output error on them with that error's bound over resamples of
   them. A size target's models are rounded as the sweep's are (without the
   calibration data, so that their errors compare fairly), and the one
   chosen is then measured as the run writes it, beside the quantize stage's
   default file that fits (modelpress.app.written: the better is taken); an
   error target's are written as the run writes them. A size target then corrects its byte budget by what the file holds
   besides those tensors (graph, decode nodes, metadata); an error target
   rescales its error budget by measured over predicted error, within the
   bracket of budgets known to meet or miss it. The uniform settings that
   could do better are measured beside them. Of the (at most MAX_PROBES + a
   few) models measured, the best that meets every target wins, or
   BudgetError says what the closest one reached.
"""
from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from modelpress.core.budget import (Allocation, BudgetError, Target, smallest, totals,
                                    with_label_costs)
from modelpress.core.candidates import KEPT, Choices, choices_for
from modelpress.core.errors import InputDataError, ModelReadError, RecipeError
from modelpress.core.pipeline import Options, plan
from modelpress.core.recipe import Recipe
from modelpress.core.store import Progress, TensorStore, WriteOptions
from modelpress.formats import open_model
from modelpress.formats.safetensors.ct_config import for_loaders as loader_recipe

from modelpress.app.evaluation import onnx_runner
from modelpress.app.sensitivity import OutputProbe, Sensitivity, runner_probe
from modelpress.app.trial import Measured, Trial
from modelpress.app.written import better_as_written, default_fit

MAX_PROBES = 8
# What compressed-tensors' pack-quantized layout holds (formats.safetensors.layout).
LOADER_WIDTHS = (4, 8)
# An error target's search aims this far under the target (the error's bound, see
# OutputProbe.errors), so that it approaches it from below.
ERROR_AIM = 0.97
# Models larger than this are not run with their weights as inputs (a copy is made in
# memory): their tensors' errors are estimated from the weights.
VARIANT_MAX_BYTES = 1 << 30


@dataclass
class Outcome:
    """What the search found: the recipe to write, and what it meets."""

    recipe: Recipe
    chosen: dict[str, str]            # tensor -> candidate label, file order
    target: Target
    limit: int | None                 # the size target in bytes
    file_bytes: int
    error: float | None               # worst output error on the search's inputs
    bound: float | None               # its bound over resamples of them (OutputProbe.errors)
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
                "error_bound": _finite(self.bound),
                "predicted_error": _finite(self.predicted), "measured_on": self.inputs,
                "errors_measured": self.measured_pairs, "candidates": self.pairs,
                "models_tried": self.probes, "counts": self.counts(),
                "chosen": dict(self.chosen)}


def search_target(src: str | os.PathLike, dst: str | os.PathLike, recipe: Recipe | None,
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
    choices = choices_for(recipe, widths, layouts=store.format == "onnx")
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
        trial = Trial(measure, writer, Path(work) / dst.name, for_loaders,
                      Path(inputs) if calibration and inputs is not None else None)
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


def settle(trial: Trial, target: Target) -> Outcome:
    """Allocate, measure and correct until `target` holds (see the module doc)."""
    store = trial.store
    limit = None if target.size is None else target.size.resolve(store.file_bytes)
    found: list[tuple[Allocation, Measured]] = []
    # A size target compares models by error: measured with gptq rounding on the samples it
    # fitted, a tensor whose inputs those few samples do not span looks finer than it is
    # (magika's last layer: 0.004 on its 16 calibration strings, 0.025 on 64 others), so
    # its trials round without them, and the model chosen is then measured as written.
    trial.free = target.error is None and trial.calibrated
    default = None
    if limit is not None:
        found += _fit_size(trial, limit)
        default = default_fit(trial, limit) if target.error is None else None
        found += [default] if default is not None else []
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
        if default is not None:
            chosen = better_as_written(trial, [chosen, default[0]], trial.table.notes)
        measured = trial.final(chosen)
    else:
        chosen, measured = min(good, key=lambda cm: (cm[1].file_bytes, cm[1].error))
    labels = trial.labels(chosen)
    if not trial.recipe(chosen).stages:
        raise BudgetError(f"{store.path}: the target is met only by the model as it is "
                          f"({measured.file_bytes} bytes): nothing to compress")
    return Outcome(trial.recipe(chosen), labels, target, limit, measured.file_bytes,
                   measured.error, measured.bound, math.sqrt(totals(trial.options, chosen)[1]),
                   None,
                   len(trial.table.measured), trial.table.pairs, len(trial.tried),
                   list(trial.table.notes))


def _meets(measured: Measured, target: Target, limit: int | None) -> bool:
    """Whether a measured model meets the target: its size, and its output error with the
    margin its inputs' sampling leaves (the bound)."""
    if limit is not None and measured.file_bytes > limit:
        return False
    return target.error is None or (measured.bound is not None and
                                    measured.bound <= target.error)


def _fit_size(trial: Trial, limit: int) -> list[tuple[Allocation, Measured]]:
    """Allocations for the size `limit`, measured; the bytes besides the chosen tensors are
    fitted to each measured file."""
    floor = totals(trial.options, smallest(trial.options))[0]
    if floor + trial.rest > limit:
        raise BudgetError(_too_small(trial, limit, floor + trial.rest))
    found: list[tuple[Allocation, Measured]] = []
    for _ in range(MAX_PROBES):
        budget = limit - trial.base
        chosen = trial.allocate(lambda opts: with_label_costs(opts, trial.costs(), size=budget))
        if chosen is None or tuple(chosen) in trial.tried:
            break
        found.append((chosen, trial(chosen)))
    if not any(m.file_bytes <= limit for _, m in found):
        raise BudgetError(_too_small(trial, limit, floor + trial.base))
    return found


def _fit_error(trial: Trial, error: float, limit: int | None
               ) -> list[tuple[Allocation, Measured]]:
    """Allocations for the error target, measured: the error budget follows measured (the
    bound) over predicted error, inside the bracket of budgets known to meet (good) or miss
    (bad) the target."""
    aim = error * ERROR_AIM
    budget, good, bad = aim * aim, 0.0, math.inf
    target = Target(error=error)
    found: list[tuple[Allocation, Measured]] = []
    for _ in range(MAX_PROBES):
        chosen = trial.allocate(lambda opts: with_label_costs(opts, trial.costs(), err2=budget))
        if tuple(chosen) in trial.tried and found:
            break
        measured = trial(chosen)
        found.append((chosen, measured))
        if _meets(measured, target, limit):
            good = max(good, budget)
        else:
            bad = min(bad, budget)
        if totals(trial.options, chosen)[1] > 0 and measured.bound:
            following = budget * (aim / measured.bound) ** 2
        else:  # nothing predicted, or nothing measured: step by 4
            following = budget * 4 if measured.bound is not None and measured.bound < aim \
                else budget / 4
        if not good < following < bad:
            following = math.sqrt(good * bad) if good > 0 and bad < math.inf else (
                bad / 4 if good == 0 else good * 4)
        if bad < math.inf and good > 0 and bad / good < 1.05:
            break
        budget = following
    if not any(_meets(m, target, None) for _, m in found):
        best = [min(range(len(o)), key=lambda i: (o[i].err2, o[i].nbytes)) for o in trial.options]
        found.append((best, trial(best)))
    return found


def _uniform(trial: Trial, target: Target, limit: int | None,
             found: list[tuple[Allocation, Measured]]) -> list[tuple[Allocation, Measured]]:
    """The uniform allocations that could beat what the search found, measured: for a size,
    the largest that fits it; for an error, each smaller than the best model found, largest
    first, while they meet it. The search never returns worse than one candidate for all."""
    best = [m for _, m in found if _meets(m, target, limit)]
    checked: list[tuple[Allocation, Measured]] = []
    for chosen in reversed(trial.uniform()):
        size = trial.estimate(chosen)
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


def _too_small(trial: Trial, limit: int, least: int) -> str:
    table = trial.table
    labels = {table.labels[i] for i in smallest(trial.options)}
    return (f"--target-size {limit} bytes is below the smallest model the candidates make "
            f"(at least {least} bytes, every chosen tensor at {'/'.join(sorted(labels))}); give "
            "a larger target or allow fewer bits (--bits 2-8)")


def _missed(trial: Trial, target: Target, limit: int | None,
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

