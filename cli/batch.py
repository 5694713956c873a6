"""Batch mode of `compress`: progress display, summary table, dry-run listing."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from modelpress.app.batch.plan import (BatchOptions, BatchPlan, DryRow, dry_run, parse_shard,
                                       plan_batch, run_batch)
from modelpress.app.batch.report import FAILED, BatchReport
from modelpress.core.errors import ModelpressError
from modelpress.core.pipeline import Options
from modelpress.core.recipe import Recipe
from modelpress.formats.location import is_dir
from modelpress.formats.onnx.options import OnnxWriteOptions
from modelpress.formats.safetensors.options import SafetensorsWriteOptions

from modelpress.cli.common import Failure
from modelpress.cli.render import dump_json, human_bytes
from modelpress.cli.terminal import consoles, new_table, progress_bar

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table

BATCH_ONLY = ("jobs", "skip_existing", "fail_fast", "shard", "dry_run", "executor", "scheduler")


def is_batch(models: tuple[Path, ...], output: Path | None) -> bool:
    """Batch mode: several inputs, a folder input, or an existing folder as output."""
    return len(models) > 1 or any(_is_dir(m) for m in models) or (
        output is not None and _is_dir(output))


def _is_dir(path: Any) -> bool:
    # A path that cannot be looked at (a name too long, storage that cannot be reached or
    # read without fsspec) is not a folder; the single-model run then reports it in one line.
    try:
        return is_dir(path)
    except (OSError, ModelpressError):
        return False


def shard_option(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
    """Click callback: 'K/N' -> (K, N)."""
    if value is None:
        return None
    try:
        return parse_shard(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def run_batch_command(models: tuple[Path, ...], output: Path, recipe: Recipe, options: Options,
                      flags: dict[str, Any], report_path: Path | None, fmt: str,
                      quiet: bool, *, onnx_options: OnnxWriteOptions,
                      safetensors_options: SafetensorsWriteOptions) -> str | None:
    """Run (or dry-run) a batch; print the summary; return a failure line or None."""
    # Failures are reported on stderr even with --quiet.
    out, err = consoles(quiet=False)
    _check_executor(flags)
    try:
        plan = plan_batch(list(models), output, flags["shard"])
    except ModelpressError as exc:
        return str(exc)
    if flags["dry_run"]:
        rows = dry_run(plan, recipe, options, flags["skip_existing"],
                       onnx_options=onnx_options, safetensors_options=safetensors_options)
        if report_path is not None:
            dump_json(report_path, {"dry_run": True, "recipe": recipe.get_config(),
                                    "rows": [r.__dict__ for r in rows]})
        if fmt == "json":
            out.print_json(json.dumps([r.__dict__ for r in rows]))
        else:
            out.print(dry_run_table(plan, rows))
        return None
    batch = BatchOptions(jobs=flags["jobs"], skip_existing=flags["skip_existing"],
                         fail_fast=flags["fail_fast"], executor=_executor(flags))
    watching = not quiet and sys.stdout.isatty() and err.is_terminal
    display = BatchProgress(err) if watching else None
    try:
        if display:
            display.start()
        report = run_batch(plan, recipe, options, batch, display, onnx_options=onnx_options,
                           safetensors_options=safetensors_options)
    except ModelpressError as exc:  # the cluster could not be reached or started
        return str(exc)
    finally:
        if display:
            display.stop()
    if report_path is not None:
        dump_json(report_path, report.as_dict())
    if fmt == "json":
        out.print_json(json.dumps(report.as_dict()))
    elif fmt == "markdown":
        out.print(markdown_batch(report), markup=False, highlight=False, soft_wrap=True)
    elif not quiet:
        out.print(batch_table(report))
        for row in report.models:
            for note in (row.report or {}).get("notes", []):
                out.print(f"note: {row.path}: {note}", markup=False, highlight=False,
                          soft_wrap=True)
        for note in report.notes:
            out.print(f"note: {note}", markup=False, highlight=False)
    return _failure_line(report, err)


def _check_executor(flags: dict[str, Any]) -> None:
    """Usage errors of --executor/--scheduler, found before anything is read."""
    if flags.get("scheduler") and flags.get("executor") != "dask":
        raise click.UsageError("--scheduler applies to --executor dask")


def _executor(flags: dict[str, Any]) -> Any:
    """None (this machine's pool) or the Dask executor the flags ask for."""
    if flags.get("executor") != "dask":
        return None
    try:
        # distributed (an optional extra, 0.5 s to import): only for --executor dask
        from modelpress.app.batch.cluster import DaskExecutor
    except ImportError as exc:
        if exc.name not in ("dask", "distributed"):
            raise
        raise Failure("--executor dask needs the distributed package: "
                      "pip install 'modelpress[dask]'") from None
    return DaskExecutor(scheduler=flags.get("scheduler"))


def _failure_line(report: BatchReport, err: Console) -> str | None:
    """Print one line per failure on stderr; the closing line, or None if all went well."""
    if not report.failed:
        return None
    for row in [*report.models, *report.copies]:
        if row.status == FAILED:
            err.print(f"failed: {row.path}: {row.reason}", markup=False, highlight=False,
                      soft_wrap=True)
    for refusal in report.refused:
        err.print(f"refused: {refusal.path}: {refusal.reason}", markup=False, highlight=False,
                  soft_wrap=True)
    failed = report.count(FAILED)
    copies = sum(1 for c in report.copies if c.status == FAILED)
    parts = [f"{failed} of {len(report.models)} models failed"]
    if copies:
        parts.append(f"{copies} files could not be copied")
    if report.refused:
        parts.append(f"{len(report.refused)} paths refused")
    return "; ".join(parts) + " (the others were written)"


class BatchProgress:
    """One live display: models done/total, files copied, and each running job's tensors."""

    def __init__(self, console: Console) -> None:
        self.bar = progress_bar(console, elapsed=True)
        self.overall = self.bar.add_task("models", total=None)
        self.running: dict[str, Any] = {}
        self.copies = self.copied = 0

    def start(self) -> None:
        self.bar.start()

    def stop(self) -> None:
        self.bar.stop()

    def __call__(self, event: tuple[Any, ...]) -> None:
        kind = event[0]
        if kind == "plan":
            self.copies = event[2]
            self.bar.update(self.overall, total=event[1], description=self._overall_text())
        elif kind == "start":
            self.running[event[1]] = self.bar.add_task(_short(event[1]), total=None)
        elif kind == "progress" and event[1] in self.running:
            _, rel, done, total, what = event
            self.bar.update(self.running[rel], completed=done, total=total,
                            description=f"  {_short(rel, 30)} {_short(what, 30)}")
        elif kind == "done" and event[1] in self.running:
            self.bar.remove_task(self.running.pop(event[1]))
        elif kind == "model":
            self.bar.advance(self.overall)
        elif kind == "copy":
            self.copied += 1
            self.bar.update(self.overall, description=self._overall_text())

    def _overall_text(self) -> str:
        return f"models (files copied {self.copied}/{self.copies})"


def _shown(path: str) -> str:
    """A path as the user would write it: relative to the working folder when inside it
    (a URL as it is)."""
    if "://" in path:
        return path
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def _short(text: str, width: int = 40) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1):]


def _ratio(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.3f}x"


def _error(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _after(value: int | None) -> str:
    return "-" if value is None else human_bytes(value)


def batch_table(report: BatchReport) -> Table:
    """One row per model and a totals row."""
    title = f"{_shown(report.base)} -> {_shown(report.outdir)}" + (
        f" (shard {report.shard})" if report.shard else "")
    table = new_table(title=title, title_justify="left")
    # Numbers never shrink; in a narrow terminal the model and note columns wrap instead.
    for header, justify, width in (("model", "left", None), ("status", "left", 7),
                                   ("before", "right", 7), ("after", "right", 7),
                                   ("ratio", "right", 6), ("worst error", "right", 6),
                                   ("note", "left", None)):
        table.add_column(header, justify=justify, no_wrap=header not in ("model", "note"),
                         min_width=width, overflow="fold" if header == "model" else "ellipsis")
    for row in report.models:
        table.add_row(row.path, row.status, human_bytes(row.bytes_before), _after(row.bytes_after),
                      _ratio(row.ratio), _error(row.worst_error), _note(row.reason))
    for refusal in report.refused:
        table.add_row(refusal.path, "failed", "-", "-", "-", "-", _note(refusal.reason))
    table.add_section()
    before, after = report.bytes_before, report.bytes_after
    table.add_row(_totals_text(report), "", human_bytes(before), human_bytes(after),
                  _ratio(after / before if before else None), _error(report.worst_error),
                  _counts_text(report), style="bold")
    return table


def _note(reason: str) -> str:
    return reason if len(reason) <= 120 else reason[:119] + "…"


def _totals_text(report: BatchReport) -> str:
    copied = sum(1 for c in report.copies if c.status == "ok")
    same = sum(1 for c in report.copies if c.status == "skipped")
    text = f"total: {len(report.models)} models, {copied} files copied"
    return text + (f" ({same} already there)" if same else "")


def _counts_text(report: BatchReport) -> str:
    return (f"{report.count('ok')} ok, {report.count('failed')} failed, "
            f"{report.count('skipped')} skipped")


def markdown_batch(report: BatchReport) -> str:
    """The summary as a GitHub-flavoured Markdown table (fits a CI job summary), human sizes."""
    lines = [f"**modelpress** `{_shown(report.base)}` -> `{_shown(report.outdir)}`"
             + (f" (shard {report.shard})" if report.shard else ""), "",
             "| model | status | before | after | ratio | worst error | note |",
             "|---|---|---:|---:|---:|---:|---|"]
    for row in report.models:
        lines.append(f"| `{row.path}` | {row.status} | {human_bytes(row.bytes_before)} | "
                     f"{_after(row.bytes_after)} | "
                     f"{_ratio(row.ratio)} | {_error(row.worst_error)} | "
                     f"{_note(row.reason).replace('|', '/')} |")
    for refusal in report.refused:
        lines.append(f"| `{refusal.path}` | failed | - | - | - | - | "
                     f"{_note(refusal.reason).replace('|', '/')} |")
    before, after = report.bytes_before, report.bytes_after
    lines.append(f"| **{_totals_text(report)}** | | {human_bytes(before)} | {human_bytes(after)} | "
                 f"{_ratio(after / before if before else None)} | "
                 f"{_error(report.worst_error)} | {_counts_text(report)} |")
    lines += [""] + [f"- {note}" for note in report.notes]
    return "\n".join(lines).rstrip() + "\n"


def dry_run_table(plan: BatchPlan, rows: list[DryRow]) -> Table:
    """What a run would do; compressed sizes are labelled as estimates."""
    table = new_table(title=f"dry run: {_shown(str(plan.base))} -> {_shown(str(plan.outdir))}"
                      + (f" (shard {plan.shard})" if plan.shard else "") + "; nothing written",
                      title_justify="left",
                      caption="est. = estimate: the recipe's bits per element (codes, kept "
                      "values and masks, scales) over the element counts of the tensors it "
                      "selects, read from headers; other bytes unchanged",
                      caption_justify="left")
    for header, justify in (("path", "left"), ("kind", "left"), ("action", "left"),
                            ("before", "right"), ("after", "right"), ("ratio", "right"),
                            ("note", "left")):
        table.add_column(header, justify=justify)
    for row in rows:
        after = "-" if row.bytes_after is None else human_bytes(row.bytes_after)
        if row.action == "compress":
            after = f"est. {after}"
        ratio = "-" if row.bytes_after is None or not row.bytes_before else \
            f"{row.bytes_after / row.bytes_before:.3f}x"
        table.add_row(row.path, row.kind, row.action, human_bytes(row.bytes_before), after, ratio,
                      _note(row.note))
    models = [r for r in rows if r.kind not in ("file", "-")]
    before = sum(r.bytes_before for r in models if r.bytes_after is not None)
    after = sum(r.bytes_after for r in models if r.bytes_after is not None)
    table.add_section()
    table.add_row(f"total: {len(models)} models, {sum(r.action == 'copy' for r in rows)} files "
                  "to copy", "", "", human_bytes(before), f"est. {human_bytes(after)}",
                  f"{after / before:.3f}x" if before else "-", "", style="bold")
    return table
