"""What every command shares: exit codes, the errors that set them, help layout, output checks."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import click

from modelpress.formats import same_file
from modelpress.formats.location import is_remote, location
from modelpress.formats.onnx.names import data_name
from modelpress.formats.outputs import output_files
from modelpress.formats.safetensors.sharded import parse_size

from modelpress.cli.entry import EXIT_FAILURE, EXIT_USAGE


class PathOrURL(click.ParamType):
    """A local path, or an fsspec URL of object storage (s3://bucket/key; a file:// URL is
    a local path): a Path or a modelpress.formats.url.ObjectPath."""

    name = "path"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not str(value):
            self.fail("an empty path names no file", param, ctx)
        return location(value)


PATH_OR_URL = PathOrURL()


class Failure(click.ClickException):
    """A model that cannot be read or written, or a stage that cannot apply (exit 1)."""

    exit_code = EXIT_FAILURE


class RecipeUsageError(click.ClickException):
    """A recipe file that is not valid (exit 2, like any other usage error)."""

    exit_code = EXIT_USAGE


def check_extra_outputs(paths: list[tuple[str, Path | None]],
                        protected: list[tuple[Path, str]]) -> None:
    """Refuse a --report (or --plot) path that would overwrite a file the run reads or
    writes, or that cannot be written at all (checked before any work starts)."""
    written = [(path, option) for option, path in paths if path is not None]
    for path, option in written:
        if path.is_dir():
            raise click.UsageError(f"{option} {path} is a folder; give a file name")
        folder = path.parent
        if not folder.is_dir():
            raise click.UsageError(f"{option} {path}: folder {folder} does not exist")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise click.UsageError(f"{option} {path}: folder {folder} is not writable")
    files = []
    for other, what in protected:
        if is_remote(other):  # the extra outputs are local files: never one in storage
            continue
        files.append((other, what))
        if what in ("the input model", "the output model"):
            if other.suffix.lower() == ".onnx":
                files.append((other.parent / data_name(other), f"the data file of {what}"))
            if what == "the input model":
                files.extend((f, f"a file of {what}") for f in output_files(other)[1:])
    files.extend((p, o) for p, o in written)
    for path, option in written:
        for other, what in files:
            if other is path or what == option:
                continue
            if same_file(path, other):
                what = f"the {what} file" if what.startswith("--") else what
                raise click.UsageError(f"{option} {path} is {what}; give another file name")


def read_paths(eval_values: dict[str, Any], recipe_file: Path | None,
               calibration: Path | None = None) -> list[tuple[Path, str]]:
    """The files a run reads besides the model, named by their option."""
    named = [(eval_values.get("inputs_path"), "--inputs"),
             (eval_values.get("labels_path"), "--labels"),
             (calibration, "--calibration")]
    return [(path, option) for path, option in named if path is not None] + (
        [] if recipe_file is None else [(recipe_file, "--recipe")])


def size_option(ctx: click.Context, param: click.Parameter, value: str | None) -> int | None:
    """Click callback: '5GB' -> bytes."""
    if value is None:
        return None
    try:
        return parse_size(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
