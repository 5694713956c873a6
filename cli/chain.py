"""The `compress` group: its own arguments first, then a chain of stage commands.

click's chained groups stop reading the group's options at its first
positional argument, so `compress MODEL -o OUT quantize ...` would treat
`-o` as a stage. This group splits the arguments at the first stage name
(skipping option values) and parses the part before it with options and
arguments interspersed. Group options written after the stages
(`... quantize --bits 4 --report r.json`) are moved before them; stage and
group option names are kept disjoint so this is unambiguous. Only click's
public, overridable methods are used (`parse_args` of a base class), never
its private attributes.
"""

from __future__ import annotations

import difflib
import os
from typing import Sequence

import click

HELP_FLAGS = ("-h", "--help")


def split_at_stage(args: Sequence[str], stage_names: set[str], value_options: set[str]) -> int:
    """Index of the first argument that names a stage (len(args) if none)."""
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            return len(args)
        if arg in value_options:
            i += 2
            continue
        if arg in stage_names:
            return i
        i += 1
    return len(args)


def mistyped_stage(head: Sequence[str], stage_names: set[str],
                   value_options: set[str]) -> tuple[str, str] | None:
    """(word, stage) for a positional argument before the stages that names no file
    but is close to a stage name: a mistyped first stage, which click would
    otherwise read as one more MODEL."""
    i = 0
    while i < len(head):
        arg = head[i]
        if arg in value_options:
            i += 2
            continue
        i += 1
        # A path-like word (a missing model.onnx) is a model, never a stage.
        if arg.startswith("-") or "." in arg or os.sep in arg or os.path.exists(arg):
            continue
        close = difflib.get_close_matches(arg, sorted(stage_names), n=1)
        if close:
            return arg, close[0]
    return None


def hoist_options(tail: Sequence[str], value_options: set[str], flag_options: set[str],
                  stage_value_options: set[str]) -> tuple[list[str], list[str]]:
    """Separate group options found among the stages: (group args, stage args)."""
    group: list[str] = []
    stages: list[str] = []
    i = 0
    while i < len(tail):
        arg = tail[i]
        key = arg.split("=", 1)[0]
        if arg in value_options:
            group += tail[i:i + 2]
            i += 2
        elif key in value_options or arg in flag_options:
            group.append(arg)
            i += 1
        elif arg in stage_value_options:
            stages += tail[i:i + 2]
            i += 2
        else:
            stages.append(arg)
            i += 1
    return group, stages


def option_names(params: Sequence[click.Parameter]) -> tuple[set[str], set[str]]:
    """(options that take a value, flags) among click parameters."""
    values, flags = set(), set()
    for p in params:
        if isinstance(p, click.Option):
            (flags if p.is_flag or p.count else values).update(p.opts + p.secondary_opts)
    return values, flags


class GroupHead(click.Command):
    """The base-class step of a chained group's parsing, given the part before the stages.

    click's `Group.parse_args` passes the arguments to its base class's
    `parse_args` and keeps what that returns as the stages' arguments. In
    `StageChain`'s bases this class comes between `Group` and `Command`, so
    that step is this method: it parses `head()`'s part with click's own
    `Command.parse_args` and returns the rest. click then stores the rest
    itself, through its public parse path (no private attribute is written).
    """

    def head(self, ctx: click.Context, args: list[str]) -> tuple[list[str], list[str]]:
        """(the group's own arguments, the stages' arguments)."""
        return args, []

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        own, rest = self.head(ctx, args)
        super().parse_args(ctx, own)
        return rest


class StageChain(click.Group, GroupHead):
    """A chained group whose options may come before, between or after its arguments."""

    allow_interspersed_args = True

    def head(self, ctx: click.Context, args: list[str]) -> tuple[list[str], list[str]]:
        value_options, flag_options = option_names(self.get_params(ctx))
        split = split_at_stage(args, set(self.commands), value_options)
        typo = mistyped_stage(args[:split], set(self.commands), value_options)
        if typo is not None:
            # The words click says for a mistyped later stage.
            raise click.UsageError(f"No such command {typo[0]!r}. Did you mean {typo[1]!r}?",
                                   ctx)
        stage_values = set()
        for command in self.commands.values():
            stage_values |= option_names(command.params)[0]
        # A help flag among the stages asks for that stage's help, so it is not hoisted.
        hoisted, tail = hoist_options(args[split:], value_options,
                                      flag_options - set(HELP_FLAGS), stage_values)
        head = list(args[:split]) + hoisted
        if tail and any(flag in tail for flag in HELP_FLAGS) and not any(
                flag in head for flag in HELP_FLAGS):
            at = min(tail.index(flag) for flag in HELP_FLAGS if flag in tail)
            self._stage_help(ctx, [a for a in tail[:at] if a in self.commands][-1])
        return head, tail

    def _stage_help(self, ctx: click.Context, name: str) -> None:
        command = self.commands[name]
        with click.Context(command, info_name=name, parent=ctx) as sub:
            click.echo(command.get_help(sub), color=ctx.color)
        ctx.exit(0)
