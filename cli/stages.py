"""Click commands for the stages, derived from each stage's dataclass fields."""

from __future__ import annotations

import dataclasses
import typing
from typing import Any

import click

from modelpress.core.errors import RecipeError
from modelpress.core.registry import REGISTRY
from modelpress.core.stage import SELECTION, Stage, cli_name, option_type

from modelpress.cli.budget import Widths, record_widths

# Stage options that take a range of values to choose from with a target (cli.budget).
RANGED = {"quantize": "bits"}


def stage_command(klass: type[Stage]) -> click.Command:
    """A click command that parses one stage's options and returns the Stage."""
    def callback(**values: Any) -> Stage:
        if klass.id in RANGED:
            values[RANGED[klass.id]] = record_widths(values[RANGED[klass.id]])
        given = {k: v for k, v in values.items() if v is not None and v != ()}
        try:
            return klass(**given)
        except RecipeError as exc:
            raise click.UsageError(str(exc)) from None

    params = [_option(klass, f) for f in dataclasses.fields(klass)]
    # Stage options first, then --include/--exclude/--take-all-named.
    params = params[SELECTION:] + params[:SELECTION]
    return click.Command(klass.id, callback=callback, params=params,
                         help=(klass.__doc__ or "").strip(), short_help=klass.summary,
                         context_settings={"help_option_names": ["-h", "--help"]})


def _option(klass: type[Stage], f: dataclasses.Field) -> click.Option:
    meta = f.metadata
    kind = option_type(klass, f.name)
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    base = kind if not args or typing.get_origin(kind) is tuple else args[0]
    default = f.default if f.default is not dataclasses.MISSING else None
    extra: dict[str, Any] = {}
    if typing.get_origin(kind) is tuple:
        extra.update(multiple=True, type=str)
    elif meta.get("choices"):
        extra["type"] = click.Choice(meta["choices"])
    elif base is bool:
        extra["is_flag"] = True
    elif base in (int, float):
        ranged = click.IntRange if base is int else click.FloatRange
        if meta.get("min") is not None or meta.get("max") is not None:
            extra["type"] = ranged(meta.get("min"), meta.get("max"), min_open=meta["min_open"],
                                   max_open=meta["max_open"])
        else:
            extra["type"] = base
    help_text = meta.get("help", "")
    if RANGED.get(klass.id) == f.name:
        extra["type"] = Widths()
        help_text += ("; with --target-size or --target-error, the widths each tensor's is "
                      "chosen from: one, or a range A-B such as 4-8 (2-8 when not given)")
    if default not in (None, ()) and "[default" not in help_text:
        help_text += f" [default: {default}]"
    names = [cli_name(f.name)]
    if base is bool and default is True:  # on unless turned off
        names = [f"{names[0]}/--no-{names[0][2:]}"]
    return click.Option(names + [f.name], default=None, help=help_text,
                        metavar=meta.get("metavar"), **extra)


def stage_commands() -> dict[str, click.Command]:
    """One command per registered stage, by id."""
    return {stage_id: stage_command(klass) for stage_id, klass in REGISTRY.items()}
