"""Options for running both models (inputs, labels) and CI thresholds, shared by commands.

Kept apart from `main.py`: `input_options` and `threshold_options` decorate a
command, `settings_from` / `thresholds_from` turn their values into library
objects, and `finish` attaches evaluation, versions and digests to a report.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

import click

from modelpress.app.environment import versions
from modelpress.app.evaluation import Baseline, EvalSettings
from modelpress.core.evaluate import Evaluation
from modelpress.core.thresholds import Thresholds, check
from modelpress.formats.location import is_remote, location
from modelpress.formats.outputs import model_sha256

from modelpress.cli.common import size_option

EXIT_THRESHOLD = 3

INPUT_PARAMS = ("inputs_path", "labels_path", "dims", "input_ranges", "no_eval",
                "max_input_bytes")
THRESHOLD_PARAMS = ("max_error", "max_output_error", "min_accuracy", "min_ratio")


class ThresholdBreach(click.ClickException):
    """A CI threshold did not hold (exit 3); the output and report are still written."""

    exit_code = EXIT_THRESHOLD


class FiniteFloatRange(click.FloatRange):
    """A FloatRange that also refuses NaN and infinity (a NaN passes every range check and
    then fails every threshold)."""

    def convert(self, value: Any, param: Any, ctx: Any) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


class DimValue(click.ParamType):
    """NAME=VALUE with a positive integer value."""

    name = "NAME=VALUE"

    def convert(self, value: Any, param: Any, ctx: Any) -> tuple[str, int]:
        if isinstance(value, tuple):
            return value
        name, sep, number = str(value).partition("=")
        try:
            size = int(number)
        except ValueError:
            size = 0
        if not sep or not name or size < 1:
            self.fail(f"{value!r} is not NAME=VALUE with a positive integer, e.g. batch=4", param,
                      ctx)
        return name, size


class RangeValue(click.ParamType):
    """NAME=LOW:HIGH, the half-open range [LOW, HIGH)."""

    name = "NAME=LOW:HIGH"

    def convert(self, value: Any, param: Any, ctx: Any) -> tuple[str, tuple[float, float]]:
        if isinstance(value, tuple):
            return value
        name, sep, bounds = str(value).partition("=")
        low_text, colon, high_text = bounds.partition(":")
        try:
            low, high = float(low_text), float(high_text)
        except ValueError:
            low = high = 0.0
        if not math.isfinite(high - low):  # NaN, infinity, or a width past float's range
            self.fail(f"{value!r}: LOW, HIGH and HIGH - LOW must be finite numbers, e.g. x=-3:3",
                      param, ctx)
        if not sep or not name or not colon or not low < high:
            self.fail(f"{value!r} is not NAME=LOW:HIGH with LOW < HIGH, e.g. input_ids=0:512",
                      param, ctx)
        return name, (low, high)


class AccuracyValue(click.ParamType):
    """A fraction in [0, 1], or a percentage written with %: 0.9 or 90%."""

    name = "FRACTION|PERCENT%"

    def convert(self, value: Any, param: Any, ctx: Any) -> float:
        if isinstance(value, float):
            return value
        text = str(value).strip()
        scale = 100.0 if text.endswith("%") else 1.0
        try:
            fraction = float(text.rstrip("%")) / scale
        except ValueError:
            fraction = -1.0
        if not 0.0 <= fraction <= 1.0:
            self.fail(f"{value!r} is not a fraction in [0, 1] or a percentage such as 91.5%",
                      param, ctx)
        return fraction


def input_options(command: Callable) -> Callable:
    """Add --inputs, --labels, --dim, --input-range and --no-eval to a command."""
    options = [
        click.option("--inputs", "inputs_path", type=click.Path(path_type=Path),
                     metavar="FILE.npz",
                     help="Evaluation inputs: arrays by input name, samples along the batch axis "
                          "[default: deterministic random inputs from the input signature]."),
        click.option("--labels", "labels_path", type=click.Path(path_type=Path),
                     metavar="FILE.npy",
                     help="Class labels of the --inputs samples: adds accuracy before and after."),
        click.option("--dim", "dims", type=DimValue(), multiple=True,
                     help="Size of a symbolic input dimension for random inputs (repeatable) "
                          "[default: 1 for names containing 'batch', 16 for others]."),
        click.option("--input-range", "input_ranges", type=RangeValue(), multiple=True,
                     help="Values of a random input are drawn from [LOW, HIGH) (repeatable) "
                          "[default: integer ids that index a Gather table: [0, rows); "
                          "other integers [0, 2); floats standard normal]."),
        click.option("--no-eval", is_flag=True,
                     help="Do not run the models (ONNX output error, accuracy and latency)."),
        click.option("--max-input-size", "max_input_bytes", type=str, callback=size_option,
                     metavar="SIZE",
                     help="Largest evaluation inputs (all arrays, in memory) to run both models "
                          "on, such as 64MiB or 1GB [default: 64MiB]."),
    ]
    for decorate in reversed(options):
        command = decorate(command)
    return command


def threshold_options(command: Callable) -> Callable:
    """Add the CI thresholds; a breach exits with code 3 after writing everything."""
    options = [
        click.option("--max-error", type=FiniteFloatRange(0), metavar="X",
                     help="Fail (exit 3) if the model-level relative weight error exceeds X."),
        click.option("--max-output-error", type=FiniteFloatRange(0), metavar="X",
                     help="Fail (exit 3) if the worst output's relative L2 error exceeds X "
                          "or cannot be measured (ONNX; runs both models)."),
        click.option("--min-accuracy", type=AccuracyValue(), metavar="X",
                     help="Fail (exit 3) if accuracy after compression is below X, a fraction "
                          "(0.9) or a percentage (90%); needs --inputs and --labels."),
        click.option("--min-ratio", type=FiniteFloatRange(0, min_open=True), metavar="X",
                     help="Fail (exit 3) unless the output is at least X times smaller than the "
                          "input (input bytes / output bytes >= X; 4 means 4x smaller)."),
    ]
    for decorate in reversed(options):
        command = decorate(command)
    return command


def pop(params: dict[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    """Remove and return the named values from a command's parameters."""
    return {name: params.pop(name, None) for name in names}


def settings_from(values: dict[str, Any], model: Any, limits: Thresholds = Thresholds(),
                  output: Any = None) -> EvalSettings | None:
    """Evaluation settings from --inputs etc., or None with --no-eval (or for a model in
    object storage: onnxruntime runs local files); usage errors exit 2."""
    inputs, labels = values.get("inputs_path"), values.get("labels_path")
    dims, ranges = dict(values.get("dims") or ()), dict(values.get("input_ranges") or ())
    running = inputs is not None or labels is not None or dims or ranges or limits.needs_evaluation
    if is_remote(model) or is_remote(output):
        if running:
            raise click.UsageError("--inputs, --labels, --dim, --input-range, "
                                   "--max-output-error and --min-accuracy run the models in "
                                   "onnxruntime, which reads local files only; give local paths")
        return None
    if values.get("no_eval"):
        if running:
            raise click.UsageError("--no-eval cannot be combined with --inputs, --labels, --dim, "
                                   "--input-range, --max-output-error or --min-accuracy")
        return None
    if model.suffix.lower() != ".onnx" and running:
        raise click.UsageError(f"{model}: safetensors holds weights only; --inputs, --labels, "
                               "--dim, --input-range, --max-output-error and --min-accuracy need "
                               "an ONNX model")
    if labels is not None and inputs is None:
        raise click.UsageError("--labels needs --inputs FILE.npz (the samples they label)")
    if limits.min_accuracy is not None and labels is None:
        raise click.UsageError("--min-accuracy needs --inputs FILE.npz and --labels FILE.npy")
    if inputs is not None and (dims or ranges):
        raise click.UsageError("--dim and --input-range shape random inputs; they do not apply "
                               "with --inputs")
    return EvalSettings(inputs=inputs, labels=labels, dims=dims, ranges=ranges,
                        max_input_bytes=values.get("max_input_bytes"))


def thresholds_from(values: dict[str, Any]) -> Thresholds:
    """The thresholds given on the command line."""
    return Thresholds(**{name: values.get(name) for name in THRESHOLD_PARAMS})


def prepare(model: Path, settings: EvalSettings | None) -> Baseline | None:
    """Run the original model now, so bad input files stop us before anything is written."""
    return None if settings is None else Baseline.prepare(model, settings)


def finish(report: Any, baseline: Baseline | None, limits: Thresholds,
           digests: bool = True) -> None:
    """Attach evaluation, versions, digests and threshold outcomes to a compress report.

    `digests=False` leaves out the input and output sha256 (reading every byte
    of a multi-GB model again) when nothing will show them.
    """
    if baseline is None:
        why = ("a model in object storage: onnxruntime runs local files"
               if is_remote(location(report.input_path)) or is_remote(location(report.output_path))
               else "--no-eval")
        report.evaluation = Evaluation("skipped", notes=[f"output evaluation skipped ({why})"])
    else:
        report.evaluation = baseline.evaluate(report.output_path)
    report.versions = versions()
    if digests:
        report.input_sha256 = model_sha256(report.input_path)
        report.output_sha256 = model_sha256(report.output_path)
    report.limits = limits
    report.checks = check(limits, report)


def raise_on_breach(report: Any) -> None:
    """Exit 3 naming each threshold that failed with its measured value."""
    failed = report.failed_checks
    if failed:
        raise ThresholdBreach("\n".join(f"threshold failed: {c.message}" for c in failed))
