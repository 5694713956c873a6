"""`compress --target-size / --target-error`: the options, their checks, and the search's run.

The search itself is modelpress.app.budget; this module parses the targets
and quantize's `--bits A-B`, refuses what cannot work before any model is
read (exit 2), and turns the search's outcome into the recipe that the run
writes (or `--print-recipe` prints) and the notes of its report.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Callable

import click

from modelpress.app.budget import Outcome, search_target
from modelpress.app.directory import model_in
from modelpress.core.budget import SizeTarget, Target
from modelpress.core.candidates import DEFAULT_WIDTHS, KEPT, parse_widths
from modelpress.core.errors import ModelpressError, RecipeError
from modelpress.core.pipeline import Options
from modelpress.core.recipe import Recipe
from modelpress.core.store import Progress, WriteOptions
from modelpress.formats.safetensors.ct_config import loads_in_transformers
from modelpress.formats.safetensors.sharded import parse_size

from modelpress.cli.batch import is_batch
from modelpress.cli.common import Failure, RecipeUsageError
from modelpress.cli.evaluation import AccuracyValue, FiniteFloatRange

TARGET_PARAMS = ("target_size", "target_error")
# click's context.meta key under which each quantize stage of the command line records the
# widths its --bits gave: (widths, the --bits text or None).
WIDTHS_KEY = "modelpress.widths"
_NUMBER = re.compile(r"^\s*\d+(\.\d*)?\s*$")


class TargetSize(click.ParamType):
    """A size with a unit (500kB, 2MiB, 1000000 bytes) or a fraction of the input (0.2, 20%)."""

    name = "SIZE|FRACTION|PERCENT%"

    def convert(self, value: Any, param: Any, ctx: Any) -> SizeTarget:
        if isinstance(value, SizeTarget):
            return value
        text = str(value).strip()
        if text.endswith("%") or (_NUMBER.match(text) and ("." in text or float(text) < 1)):
            fraction = AccuracyValue().convert(text, param, ctx)
            if fraction > 0:
                return SizeTarget(fraction=fraction)
            self.fail(f"{value!r}: a size target must be more than 0", param, ctx)
        try:
            return SizeTarget(nbytes=parse_size(text))
        except ValueError as exc:
            self.fail(f"{exc}, or a fraction of the input (0.2 or 20%)", param, ctx)


class Widths(click.ParamType):
    """quantize --bits: a width 2-8, or with a target a range A-B to choose from."""

    name = "N|A-B"

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        if isinstance(value, (int, tuple)):
            return value
        if "-" not in str(value):
            return click.IntRange(2, 8).convert(value, param, ctx)
        try:
            return parse_widths(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def target_options(command: Callable) -> Callable:
    """Add --target-size and --target-error to a command."""
    options = [
        click.option("--target-size", type=TargetSize(), metavar="SIZE",
                     help="Choose each tensor's precision (the quantize stage's --bits, "
                          "default 2-8, in ONNX each below 8 also in groups of 64 and 8 such "
                          "as int4g64; fp16; or as it is) for the least output error within "
                          "this file size: bytes with a unit (500kB, 2MiB) or a fraction of "
                          "the input (0.2 or 20%). ONNX runs use --calibration (or --inputs) "
                          "to measure each tensor's effect on the outputs."),
        click.option("--target-error", type=FiniteFloatRange(0, min_open=True), metavar="E",
                     help="Choose each tensor's precision for the smallest file whose worst "
                          "output relative error on --calibration FILE.npz (or --inputs) is at "
                          "most E (ONNX). With --target-size too, both must hold. With "
                          "quantize --activations int8: the activations kept float are chosen "
                          "until the error on --calibration is at most E [default there: "
                          "0.02]."),
    ]
    for decorate in reversed(options):
        command = decorate(command)
    return command


def record_widths(bits: Any) -> int | None:
    """For the quantize stage's callback: note the widths its --bits gives (in the current
    click context) and return the one width to build the stage with."""
    if bits is None:
        widths, text = DEFAULT_WIDTHS, None
    elif isinstance(bits, tuple):
        widths, text = bits, f"{bits[0]}-{bits[-1]}"
    else:
        widths, text = (bits,), None
    click.get_current_context().meta.setdefault(WIDTHS_KEY, []).append((widths, text))
    return None if bits is None else widths[-1]


def target_from(values: dict[str, Any]) -> Target | None:
    """The target the options give, or None."""
    if values.get("target_size") is None and values.get("target_error") is None:
        return None
    return Target(size=values.get("target_size"), error=values.get("target_error"))


def check_usage(target: Target | None, model: Path, recipe_file: Path | None,
                data: Path | None) -> tuple[int, ...] | None:
    """Refuse what a target (or its absence) cannot take, before any model is read; the
    widths to choose from (None: from the recipe file)."""
    recorded = click.get_current_context().meta.get(WIDTHS_KEY, [])
    ranges = [text for _, text in recorded if text is not None]
    if target is None:
        if ranges:
            raise click.UsageError(f"quantize --bits {ranges[0]}: a range of widths needs "
                                   "--target-size or --target-error to choose from it; "
                                   "without a target give one width (--bits 4)")
        return None
    if target.error is not None and model.suffix.lower() != ".onnx":
        raise click.UsageError(f"{model}: --target-error needs a model to run (ONNX); "
                               "safetensors holds weights only (--target-size works)")
    if target.error is not None and data is None:
        raise click.UsageError("--target-error needs inputs to measure the error on: give "
                               "--calibration FILE.npz (or --inputs FILE.npz)")
    if recipe_file is not None or not recorded:
        return None
    return recorded[0][0]


def searcher(target: Target | None, models: tuple[Path, ...], output: Path | None,
             recipe: Recipe, recipe_file: Path | None, calibration: Path | None,
             eval_values: dict[str, Any], options: Options,
             writers: tuple[WriteOptions, WriteOptions]
             ) -> Callable[[Progress | None], Outcome] | None:
    """After the usage checks (`check_usage`), a function that runs the search with a
    progress callback and returns its outcome (a problem becomes one line and its exit
    code); None without a target. `eval_values`: the --inputs etc. options; `writers`:
    the ONNX and safetensors writer settings."""
    model = models[0]
    data = calibration if calibration is not None else eval_values.get("inputs_path")
    folder = target is not None and is_batch(models, output)
    if folder:
        model = _directory_model(models, output)
    widths = check_usage(target, model, recipe_file, data)
    if target is None:
        return None
    onnx = model.suffix.lower() == ".onnx"
    dst = model if output is None else output / model.name if folder else output

    def run(progress: Progress | None) -> Outcome:
        try:
            return search_target(model, dst, recipe, target, widths=widths,
                          inputs=data if onnx else None, calibration=calibration is not None,
                          options=options, writer=writers[0] if onnx else writers[1],
                          progress=progress, for_loaders=folder)
        except RecipeError as exc:
            raise RecipeUsageError(str(exc)) from None
        except ModelpressError as exc:
            raise Failure(str(exc)) from None
    return run


def _directory_model(models: tuple[Path, ...], output: Path | None) -> Path:
    """The weights of the one Hugging Face model directory a target may take in batch mode,
    or a usage error."""
    problem = "--target-size and --target-error apply to one model: a file, or a Hugging " \
              "Face model directory (config.json and one safetensors model)"
    if len(models) != 1 or not models[0].is_dir():
        raise click.UsageError(problem)
    try:
        model = model_in(models[0])
    except ModelpressError:
        raise click.UsageError(problem) from None
    if model.parent != models[0] or not loads_in_transformers(models[0] / "config.json") \
            or model.suffix.lower() != ".safetensors":
        raise click.UsageError(problem)
    return model


def attach(report: Any, outcome: Outcome) -> None:
    """Add the search's outcome to a compress report: its summary as notes, every number
    under `budget` in JSON."""
    report.notes.extend(summary(outcome))
    report.budget = outcome.as_dict()


def recipe_text(outcome: Outcome, calibration: Path | None) -> str:
    """The recipe YAML --print-recipe shows for a target, with what it was searched for."""
    head = [f"# {line}" for line in summary(outcome)]
    if calibration is not None:
        head.append(f"# rerun with --calibration {calibration} for the same bytes")
    return "\n".join(head) + "\n" + outcome.recipe.to_yaml()


def summary(outcome: Outcome) -> list[str]:
    """What the search met, in a few lines (report notes, the printed recipe's header)."""
    wanted = []
    if outcome.limit is not None:
        wanted.append(f"--target-size {outcome.limit} bytes")
    if outcome.target.error is not None:
        wanted.append(f"--target-error {outcome.target.error:g}")
    error = "" if outcome.error is None else (
        f", output error {outcome.error:.4g} on {outcome.inputs} ({outcome.bound:.4g} at the "
        f"90% bound over its samples; predicted {outcome.predicted:.4g})")
    counts = ", ".join(f"{label} {n}" for label, n in outcome.counts().items())
    lines = [f"target {' and '.join(wanted)}: met, {outcome.file_bytes} bytes{error}",
             f"target: chosen per tensor: {counts} (errors of {outcome.measured_pairs} of "
             f"{outcome.pairs} candidates measured by running the model; {outcome.probes} "
             "models written and measured)"]
    kept = [name for name, label in outcome.chosen.items() if label == KEPT]
    if kept:
        lines.append(f"target: kept as they are: {', '.join(kept)}")
    return lines + list(outcome.notes)
