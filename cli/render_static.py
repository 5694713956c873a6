"""The static int8 section of a compress report: which nodes onnxruntime runs as integer
kernels and which stay float (with why), as a rich table and as Markdown."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from modelpress.cli.terminal import new_table, new_text

if TYPE_CHECKING:
    from rich.table import Table

# Float products named one by one at most (the JSON report names every one).
SHOWN = 8


def kernel_rows(static: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(what, count, detail) rows: integer kernels, float products, Q/DQ conversions."""
    kernels = static["kernels"]
    rows = [("integer kernels", str(kernels["integer_count"]),
             ", ".join(f"{k} {v}" for k, v in kernels["integer"].items()) or "none")]
    reasons = kernels["float_reasons"]
    detail = "; ".join(f"{name}: {why}" for name, why in list(reasons.items())[:SHOWN])
    if len(reasons) > SHOWN:
        detail += f"; and {len(reasons) - SHOWN} more (--report)"
    rows.append(("float Conv/MatMul/Gemm", str(kernels["float_count"]), detail or "none"))
    rows.append(("Q/DQ conversions left", str(sum(kernels["conversions"].values())),
                 ", ".join(f"{k} {v}" for k, v in kernels["conversions"].items()) or "none"))
    acts = static["activations"]
    rows.append(("activations kept float", f"{len(acts['kept_float'])} of {acts['groups']}",
                 ", ".join(acts["kept_float"][:SHOWN]) or "none"))
    return rows


def kernel_table(static: dict[str, Any]) -> Table:
    """The rows as a rich table."""
    table = new_table(title="onnxruntime's optimized graph (static int8)", title_justify="left")
    for header, justify in (("nodes", "left"), ("count", "right"), ("which", "left")):
        table.add_column(header, justify=justify)
    for what, count, detail in kernel_rows(static):
        table.add_row(what, count, new_text(detail))
    return table


def markdown_kernels(static: dict[str, Any]) -> list[str]:
    """The rows as a Markdown table."""
    lines = ["", "**onnxruntime's optimized graph (static int8)**", "",
             "| nodes | count | which |", "|---|---:|---|"]
    for what, count, detail in kernel_rows(static):
        lines.append(f"| {what} | {count} | {detail.replace('|', '/')} |")
    return lines
