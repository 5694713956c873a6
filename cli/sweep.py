"""`modelpress sweep`: each technique at several settings, side by side."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from modelpress.app.environment import versions
from modelpress.app.sweep import (BITS_DEFINITION, DEFAULT_SETTINGS, FRONT_DEFINITION, SweepReport,
                                  SweepRow, load_settings, sweep as run_sweep)
from modelpress.core.errors import ModelpressError, RecipeError
from modelpress.core.pipeline import DEFAULT_MIN_ELEMENTS, Options
from modelpress.formats.outputs import model_sha256

from modelpress.cli import evaluation
from modelpress.cli.common import Failure, RecipeUsageError, check_extra_outputs, read_paths
from modelpress.cli.entry import CONTEXT
from modelpress.cli.plot import plot_sweep
from modelpress.cli.render import dump_json, human_bytes
from modelpress.cli.render_eval import fmt_number, fmt_percent, inputs_label
from modelpress.cli.terminal import consoles, new_table, progress

if TYPE_CHECKING:
    from rich.console import Console

PLOT_HINT = "pip install 'modelpress[plot]'"
# Fewer timed runs than compress: a sweep runs a dozen models.
SWEEP_RUNS, SWEEP_BUDGET_S = 10, 0.5


@click.command(context_settings=CONTEXT)
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--recipes", "recipes_file", type=click.Path(path_type=Path), metavar="FILE",
              help="Sweep these named recipes (YAML or JSON) instead of the built-in settings.")
@click.option("--plot", "plot_path", type=click.Path(path_type=Path), metavar="FILE.png",
              help=f"Also draw error against size with the Pareto front ({PLOT_HINT}).")
@click.option("--min-elements", type=click.IntRange(1), default=DEFAULT_MIN_ELEMENTS,
              show_default=True,
              help="Smallest tensor stages change unless it is named with --include.")
@click.option("--report", "report_path", type=click.Path(path_type=Path), metavar="FILE.json",
              help="Also write every number of the table to this JSON file.")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "markdown"]),
              default="table", show_default=True, help="What to print on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no table.")
@evaluation.input_options
def sweep(model: Path, recipes_file: Path | None, plot_path: Path | None, min_elements: int,
          report_path: Path | None, fmt: str, quiet: bool, **values: Any) -> None:
    """Compress MODEL with each technique at several settings and compare them.

    Nothing is written but the optional plot and report: each setting is
    applied in memory (ONNX settings are run from a temporary file). The table
    shows, per setting, the file size and ratio (after / before), bits per
    weight (bytes written for the changed tensors x 8 / their element count:
    scales, zero points, masks and factors included), the model-level weight
    error, for ONNX the worst output's relative error, top-1 agreement and
    latency ratio (median of onnxruntime CPU runs on this machine), and marks
    the size/error Pareto front (by output error for ONNX, else weight error).
    A setting whose stage is not in this build is listed as skipped.

    \b
    Built-in settings: int8 channel, int4 g128, int4 g32 mse, fp16, fp8 e4m3,
    prune 50%, prune 2:4 + int4, lowrank 0.5 and 0.25, cluster 4-bit and 6-bit.

    \b
    Examples:
      modelpress sweep sample_models/mlp.onnx
      modelpress sweep sample_models/transformer.onnx --plot sweep.png
      modelpress sweep mlp.onnx --inputs x.npz --labels y.npy --format markdown
      modelpress sweep model.onnx --recipes mine.yaml --report sweep.json

    \b
    --recipes file (YAML or JSON), a list of named recipes:
      - name: int8
        stages: [{id: quantize, bits: 8}]
      - name: prune then int4
        stages: [{id: prune, sparsity: 0.5}, {id: quantize, bits: 4}]
    """
    settings_values = evaluation.pop(values, evaluation.INPUT_PARAMS)
    check_extra_outputs([("--report", report_path), ("--plot", plot_path)],
                        [(model, "the input model"), *read_paths(settings_values, None),
                         *([] if recipes_file is None else [(recipes_file, "--recipes")])])
    eval_settings = evaluation.settings_from(settings_values, model)
    if eval_settings is not None:
        eval_settings = dataclasses.replace(eval_settings, max_runs=SWEEP_RUNS,
                                            time_budget_s=SWEEP_BUDGET_S)
    if plot_path is not None and importlib.util.find_spec("matplotlib") is None:
        raise Failure(f"--plot needs matplotlib, which is not installed: {PLOT_HINT}")
    settings = DEFAULT_SETTINGS
    if recipes_file is not None:
        try:
            settings = tuple(load_settings(recipes_file))
        except RecipeError as exc:
            raise RecipeUsageError(str(exc)) from None
    out, err = consoles(quiet)
    bar, update = progress(err, quiet)
    try:
        if bar is not None:
            bar.start()
        report = run_sweep(model, settings, Options(min_elements=min_elements), eval_settings, update)
        _provenance(report)
    except ModelpressError as exc:
        raise Failure(str(exc)) from None
    finally:
        if bar is not None:
            bar.stop()
    if report_path is not None:
        dump_json(report_path, report.as_dict())
    if plot_path is not None:
        plot_sweep(report, plot_path)
    if not quiet or fmt != "table":
        print_sweep(out, report, fmt)
    if plot_path is not None and not quiet and fmt == "table":
        out.print(f"plot: {plot_path}", markup=False, highlight=False)


def _provenance(report: SweepReport) -> None:
    report.versions = versions()
    report.input_sha256 = model_sha256(report.model)


def columns(report: SweepReport) -> list[str]:
    """Column headers; accuracy only when labels were given, model columns only for ONNX."""
    heads = ["setting", "size", "ratio", "bits/weight", "weight error"]
    if report.format == "onnx":
        heads += ["output error", "top-1 agree"]
        if report.accuracy_before is not None:
            heads.append("accuracy")
        heads.append("latency")
    return heads + ["front"]


def cells(report: SweepReport, row: SweepRow, front_mark: str) -> list[str]:
    """One table row; a skipped or failed setting shows its name and '-' elsewhere."""
    if row.status != "ok":
        return [row.name, row.status] + ["-"] * (len(columns(report)) - 3) + [""]
    values = [row.name, human_bytes(row.file_bytes), f"{row.ratio:.3f}x",
              fmt_number(row.bits_per_weight, ".2f"), fmt_number(row.weight_error.rel_l2, ".4f")]
    if report.format == "onnx":
        values += [fmt_number(row.output_error, ".4f"), fmt_percent(row.top1_agreement)]
        if report.accuracy_before is not None:
            values.append("-" if row.accuracy is None else f"{100 * row.accuracy:.2f}%")
        values.append(fmt_number(row.latency_ratio, ".2f") + ("x" if row.latency_ratio else ""))
    return values + [front_mark if row.on_front else ""]


def footnotes(report: SweepReport) -> list[str]:
    """Definitions, the baseline, and each skipped or failed setting's reason."""
    lines = [BITS_DEFINITION, f"{FRONT_DEFINITION} (by {report.front_metric})"]
    if report.format == "onnx" and report.baseline is not None and report.baseline.status == "ok":
        lines.append(f"output error: the worst output's relative L2 error against the "
                     f"original's ({report.baseline.runtime}; inputs "
                     f"{inputs_label(report.baseline)})")
        lines.append("latency: median run time over the original's, measured on this machine")
    if report.accuracy_before is not None:
        lines.append(f"accuracy of the original: {100 * report.accuracy_before:.2f}%")
    lines += report.notes
    lines += [f"{row.name}: {row.note}" for row in report.rows if row.note]
    return lines


def print_sweep(console: Console, report: SweepReport, fmt: str) -> None:
    """Print a sweep in the chosen format."""
    if fmt == "json":
        console.print_json(json.dumps(report.as_dict()))
        return
    if fmt == "markdown":
        console.print(markdown_sweep(report), markup=False, highlight=False, soft_wrap=True)
        return
    table = new_table(title=f"{report.model} ({report.format}, {human_bytes(report.file_bytes)}): "
                            f"{len(report.ran)} of {len(report.rows)} settings ran",
                      title_justify="left")
    for head in columns(report):
        table.add_column(head, justify="left" if head in ("setting", "front") else "right",
                         no_wrap=True)
    for row in report.rows:
        table.add_row(*cells(report, row, "*"), style=None if row.status == "ok" else "dim")
    console.print(table)
    for line in footnotes(report):
        console.print(f"note: {line}", markup=False, highlight=False, soft_wrap=True)


def markdown_sweep(report: SweepReport) -> str:
    """The sweep as a GitHub-flavoured Markdown table plus notes."""
    heads = columns(report)
    lines = [f"**modelpress sweep** `{report.model}` ({report.format}, {report.file_bytes} "
             f"bytes): {len(report.ran)} of {len(report.rows)} settings ran", "",
             "| " + " | ".join(heads) + " |",
             "|" + "|".join("---" if h in ("setting", "front") else "---:" for h in heads) + "|"]
    for row in report.rows:
        lines.append("| " + " | ".join(c.replace("|", "\\|")
                                       for c in cells(report, row, "yes")) + " |")
    lines.append("")
    lines += [f"- {line.replace('|', chr(92) + '|')}" for line in footnotes(report)]
    return "\n".join(lines) + "\n"
