"""What every command shares: exit codes, the errors that set them, help layout, output checks."""

from __future__ import annotations

from pathlib import Path

import click

from modelpress.formats import same_file

from modelpress.cli.entry import EXIT_FAILURE, EXIT_USAGE



class Failure(click.ClickException):
    """A model that cannot be read or written, or a stage that cannot apply (exit 1)."""

    exit_code = EXIT_FAILURE


class RecipeUsageError(click.ClickException):
    """A recipe file that is not valid (exit 2, like any other usage error)."""

    exit_code = EXIT_USAGE


def check_extra_outputs(paths: list[tuple[str, Path | None]],
                        protected: list[tuple[Path, str]]) -> None:
    """Refuse a --report (or --plot) path that would overwrite the input model or the output."""
    for option, path in paths:
        for other, what in protected:
            if path is not None and same_file(path, other):
                raise click.UsageError(f"{option} {path} is {what}; give another file name")
