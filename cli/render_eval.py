"""Rendering output evaluation and threshold outcomes (rich and Markdown)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from modelpress.core.evaluate import Evaluation

from modelpress.cli.terminal import new_table

if TYPE_CHECKING:
    from rich.console import Console


def fmt_number(value: float | None, spec: str) -> str:
    """A number for a table cell: '-' when unknown, 'nan' when not a number."""
    if value is None:
        return "-"
    if math.isnan(value):
        return "nan"
    return format(value, spec)


def fmt_percent(value: float | None) -> str:
    """A fraction as a percentage with one decimal, '-' when unknown."""
    return "-" if value is None else f"{100 * value:.1f}%"


def inputs_label(evaluation: Evaluation) -> str:
    """Where the inputs came from and their shapes: 'random: input_ids int64 [1, 16]'."""
    arrays = evaluation.inputs.get("arrays", {})
    shapes = ", ".join(f"{name} {a['dtype']} {a['shape']}" for name, a in arrays.items())
    source = evaluation.inputs.get("source", "random")
    return f"{source}: {shapes}" if shapes else source


def output_rows(evaluation: Evaluation) -> list[list[str]]:
    """One row per output: name, shape, rel. error, cosine, max abs error, top-1 agreement."""
    return [[o.name, "x".join(map(str, o.shape)), fmt_number(o.error.rel_l2, ".4f"),
             fmt_number(o.error.cosine, ".5f"), fmt_number(o.error.max_abs, ".4g"), fmt_percent(o.top1_agreement)]
            for o in evaluation.outputs]


HEADERS = ("output", "shape", "rel. error", "cosine", "max abs error", "top-1 agreement")


def summary_lines(evaluation: Evaluation) -> list[str]:
    """Accuracy and latency in one line each, then the evaluation's notes."""
    lines = []
    if evaluation.accuracy is not None:
        a = evaluation.accuracy
        lines.append(f"accuracy ({a.count} labels, output {a.output!r}): "
                     f"{100 * a.before:.2f}% -> {100 * a.after:.2f}% "
                     f"({a.change_points:+.2f} points)")
    if evaluation.latency is not None:
        t = evaluation.latency
        lines.append(f"latency (median of {_runs(t)} on this machine; [interquartile range]): "
                     f"{t.before_ms:.3g} ms{_iqr(t.before_iqr_ms)} -> "
                     f"{t.after_ms:.3g} ms{_iqr(t.after_iqr_ms)} ({fmt_number(t.ratio, '.2f')}x)")
    return lines + list(evaluation.notes)


def _runs(t: Any) -> str:
    if t.runs_before == t.runs_after:
        return f"{t.runs_before} alternating onnxruntime CPU runs of each model"
    return f"{t.runs_before} runs of the original, {t.runs_after} of the compressed model"


def _iqr(iqr: tuple[float, float] | None) -> str:
    return "" if iqr is None else f" [{iqr[0]:.3g}-{iqr[1]:.3g}]"


def print_evaluation(console: Console, report: Any) -> None:
    """The output-error table, accuracy, latency and threshold outcomes after the size table."""
    evaluation = report.evaluation
    if evaluation is not None:
        if evaluation.outputs:
            console.print(f"evaluation: {evaluation.runtime}; inputs {inputs_label(evaluation)}",
                          markup=False, highlight=False, soft_wrap=True)
            table = new_table(title="output error, compressed vs original", title_justify="left")
            for header in HEADERS:
                table.add_column(header, justify="left" if header in ("output", "shape")
                                 else "right", no_wrap=True)
            for row in output_rows(evaluation):
                table.add_row(*row)
            console.print(table)
        for line in summary_lines(evaluation):
            console.print(line, markup=False, highlight=False, soft_wrap=True)
    for check in report.checks:
        status = "ok" if check.passed else "FAILED"
        console.print(f"threshold {status}: {check.message}", markup=False, highlight=False,
                      soft_wrap=True)


def markdown_evaluation(report: Any) -> list[str]:
    """Markdown tables for output error and thresholds, and lines for accuracy and latency."""
    lines: list[str] = []
    evaluation = report.evaluation
    if evaluation is not None:
        if evaluation.outputs:
            lines += ["", f"Output error ({evaluation.runtime}; inputs "
                          f"{_md(inputs_label(evaluation))}):", "",
                      "| " + " | ".join(HEADERS) + " |",
                      "|---|---|---:|---:|---:|---:|"]
            lines += ["| " + " | ".join(_md(c) for c in row) + " |"
                      for row in output_rows(evaluation)]
        if evaluation.accuracy is not None or evaluation.latency is not None:
            lines += ["", "| measure | before | after | change |", "|---|---:|---:|---:|"]
            if evaluation.accuracy is not None:
                a = evaluation.accuracy
                lines.append(f"| accuracy ({a.count} labels) | {100 * a.before:.2f}% | "
                             f"{100 * a.after:.2f}% | {a.change_points:+.2f} points |")
            if evaluation.latency is not None:
                t = evaluation.latency
                lines.append(f"| latency, median ms (this machine) | {t.before_ms:.3g}"
                             f"{_iqr(t.before_iqr_ms)} | {t.after_ms:.3g}{_iqr(t.after_iqr_ms)} "
                             f"| {fmt_number(t.ratio, '.2f')}x |")
                latency_line = (f"- latency: median of {_runs(t)}; "
                                "[interquartile range]")
        notes = [f"- {_md(note)}" for note in evaluation.notes]
        if evaluation.latency is not None:
            notes.insert(0, latency_line)
        if notes:
            lines += [""] + notes
    if report.checks:
        lines += ["", "| threshold | limit | measured | result |", "|---|---:|---:|---|"]
        for check in report.checks:
            lines.append(f"| `{check.option}` | {check.limit:g} | "
                         f"{fmt_number(check.measured, '.4g')} | "
                         f"{'pass' if check.passed else '**FAIL**'} |")
    return lines


def _md(text: str) -> str:
    """Escape the characters that would break a Markdown table cell."""
    return str(text).replace("|", "\\|")
