"""Rendering reports for people (rich tables) and for machines (JSON, Markdown)."""

from __future__ import annotations

import json
import math
from typing import TYPE_CHECKING, Any

from modelpress.core.report import InspectReport, Report
from modelpress.formats.atomic import atomic_path

from modelpress.cli.render_eval import markdown_evaluation, print_evaluation
from modelpress.cli.render_static import kernel_table, markdown_kernels
from modelpress.cli.terminal import new_table, new_text

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text


def human_bytes(n: int) -> str:
    """Bytes in decimal units with three significant digits: 65.5 kB."""
    if n < 1000:
        return f"{n} B"
    for unit in ("kB", "MB", "GB", "TB"):
        n /= 1000.0
        if n < 1000 or unit == "TB":
            return f"{n:.3g} {unit}"
    return f"{n} B"


def _num(value: float | None, spec: str, infinite: str = "exact") -> str:
    """`value` formatted; +inf (an exact SQNR) is `infinite`, -inf "-"."""
    if value is None or (isinstance(value, float) and math.isinf(value)):
        return infinite if value is None or value > 0 else "-"
    return format(value, spec)


def printable(text: str) -> str:
    """`text` with control characters (terminal escapes) written as escapes: \\x1b."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text)


def plain(value: object) -> Text:
    """Text shown as is: tensor names and paths come from files and may hold '[...]'
    (rich markup) or control characters."""
    return new_text(printable(str(value)))


def _ratio(after: int, before: int) -> str:
    return f"{after / before:.3f}x" if before else "-"


def report_table(report: Report) -> Table:
    """The size and error table printed after every compress."""
    table = new_table(title=plain(f"{report.input_path} -> {report.output_path}"),
                      title_justify="left")
    for header, justify in (("tensor", "left"), ("shape", "left"), ("encoding", "left"),
                            ("before", "right"), ("after", "right"), ("ratio", "right"),
                            ("rel. error", "right"), ("SQNR dB", "right")):
        table.add_column(header, justify=justify, no_wrap=header != "tensor")
    for row in report.rows:
        table.add_row(plain(row.name), "x".join(map(str, row.shape)), plain(row.encoding),
                      human_bytes(row.bytes_before), human_bytes(row.bytes_after),
                      _ratio(row.bytes_after, row.bytes_before),
                      _num(row.error.rel_l2, ".4f", "inf"), _num(row.error.sqnr_db, ".1f"))
    total = report.weight_error
    table.add_section()
    table.add_row(f"total: file on disk ({len(report.rows)} tensors changed)", "", "",
                  human_bytes(report.file_bytes_before), human_bytes(report.file_bytes_after),
                  _ratio(report.file_bytes_after, report.file_bytes_before),
                  _num(total.rel_l2, ".4f", "inf") if report.rows else "-",
                  _num(total.sqnr_db, ".1f") if report.rows else "-", style="bold")
    return table


def print_report(console: Console, report: Report, fmt: str) -> None:
    """Print a compress report in the chosen format."""
    if fmt == "json":
        console.print_json(json.dumps(report.as_dict()))
        return
    if fmt == "markdown":
        console.print(markdown_report(report), markup=False, highlight=False, soft_wrap=True)
        return
    console.print(report_table(report))
    if report.static_int8 is not None:
        console.print(kernel_table(report.static_int8))
    for note in report.notes:
        console.print(f"note: {printable(note)}", markup=False, highlight=False)
    print_evaluation(console, report)


# Tensor rows a Markdown report shows at most (the largest); JSON always has every row.
MARKDOWN_ROWS = 20


def markdown_report(report: Report, max_rows: int = MARKDOWN_ROWS) -> str:
    """The report as a GitHub-flavoured Markdown table (fits a CI job summary).

    Sizes are human (65.5 kB). Above `max_rows` tensors, the largest
    `max_rows` (by size before, in file order) are shown and one row sums up
    the rest; the full table is in `--report` / `--format json`.
    """
    lines = [f"**modelpress** `{report.input_path}` -> `{report.output_path}`", "",
             "| tensor | shape | encoding | before | after | ratio | rel. error | SQNR dB |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    shown = report.rows
    if len(shown) > max_rows:
        largest = sorted(range(len(shown)), key=lambda i: -shown[i].bytes_before)[:max_rows]
        shown = [shown[i] for i in sorted(largest)]
    for row in shown:
        lines.append(f"| `{_md_cell(row.name)}` | {'x'.join(map(str, row.shape))} | {row.encoding} | "
                     f"{human_bytes(row.bytes_before)} | {human_bytes(row.bytes_after)} | "
                     f"{_ratio(row.bytes_after, row.bytes_before)} | "
                     f"{_num(row.error.rel_l2, '.4f', 'inf')} | {_num(row.error.sqnr_db, '.1f')} |")
    if len(shown) < len(report.rows):
        kept = {id(row) for row in shown}
        rest = [row for row in report.rows if id(row) not in kept]
        before = sum(row.bytes_before for row in rest)
        after = sum(row.bytes_after for row in rest)
        lines.append(f"| {len(rest)} smaller tensors (every row: `--format json`) | | | "
                     f"{human_bytes(before)} | {human_bytes(after)} | {_ratio(after, before)} "
                     "| | |")
    total = report.weight_error
    lines.append(f"| **total (file on disk)** | | | {human_bytes(report.file_bytes_before)} | "
                 f"{human_bytes(report.file_bytes_after)} | "
                 f"{_ratio(report.file_bytes_after, report.file_bytes_before)} | "
                 f"{_num(total.rel_l2, '.4f', 'inf') if report.rows else '-'} | "
                 f"{_num(total.sqnr_db, '.1f') if report.rows else '-'} |")
    if report.static_int8 is not None:
        lines += markdown_kernels(report.static_int8)
    lines += [""] + [f"- {printable(note)}" for note in report.notes]
    lines += markdown_evaluation(report)
    return "\n".join(lines).rstrip() + "\n"


def _md_cell(text: str) -> str:
    """A tensor name safe inside a Markdown table cell's code span."""
    return printable(text).replace("|", "\\|").replace("`", "'")


def print_inspect(console: Console, report: InspectReport, fmt: str) -> None:
    """Print the tensors of a model."""
    if fmt == "json":
        console.print_json(json.dumps(report.as_dict()))
        return
    table = new_table(title=plain(f"{report.path} ({report.format}, "
                                  f"{human_bytes(report.file_bytes)} on disk)"),
                      title_justify="left")
    for header, justify in (("tensor", "left"), ("shape", "left"), ("dtype", "left"),
                            ("encoding", "left"), ("stored", "right"), ("zeros", "right"),
                            ("weight", "center")):
        table.add_column(header, justify=justify)
    for row in report.rows:
        zeros = "-" if row.zero_fraction is None else f"{100 * row.zero_fraction:.1f}%"
        table.add_row(plain(row.name), "x".join(map(str, row.shape)) or "scalar", plain(row.dtype),
                      plain(row.encoding),
                      human_bytes(row.stored_bytes), zeros, "yes" if row.weight_like else "")
    console.print(table)


def dump_json(path: Any, data: dict[str, Any]) -> None:
    """Write a JSON document atomically (used for --report)."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2)
            fh.write("\n")
