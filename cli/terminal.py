"""rich objects for the commands, rich itself imported on first use.

`modelpress --help` and `--version` print nothing through rich, and importing
it (0.05-0.1 s) would be a third of their 0.3 s start-up budget; so the other
cli modules name rich's types for type checking only and build every rich
object through the functions here.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress
    from rich.table import Table
    from rich.text import Text

Update = Callable[[int, int, str], None]


def consoles(quiet: bool) -> tuple[Console, Console]:
    """(stdout console, stderr console); a non-terminal stdout gets a fixed width of 160."""
    rich = _rich()
    out = rich.console.Console(soft_wrap=False, width=None if sys.stdout.isatty() else 160)
    err = rich.console.Console(stderr=True, quiet=quiet)
    return out, err


def progress_bar(console: Console, elapsed: bool = False) -> Progress:
    """A transient bar: description, bar, done/total (and the time elapsed)."""
    bars = _rich().progress
    columns: list[Any] = [bars.TextColumn("{task.description}"), bars.BarColumn(),
                          bars.MofNCompleteColumn()]
    if elapsed:
        columns.append(bars.TimeElapsedColumn())
    return bars.Progress(*columns, console=console, transient=True)


def progress(err_console: Console | None, quiet: bool) -> tuple[Progress | None, Update | None]:
    """A progress bar on stderr and its update function when a person is watching, else Nones."""
    if err_console is None or quiet or not err_console.is_terminal:
        return None, None
    bar = progress_bar(err_console)
    task = bar.add_task("compressing", total=None)

    def update(done: int, total: int, what: str) -> None:
        bar.update(task, completed=done, total=total, description=what[:60] or "done")
    return bar, update


def new_table(**settings: Any) -> Table:
    """A rich Table with these settings (title, title_justify, caption...)."""
    return _rich().table.Table(**settings)


def new_text(value: str) -> Text:
    """A rich Text shown as is (no markup)."""
    return _rich().text.Text(value)


def _rich() -> Any:
    """The rich package with the modules used here loaded."""
    import rich.console, rich.progress, rich.table, rich.text  # noqa: E401  (on first use: start-up budget)
    return rich
