"""The `modelpress` command as a process starts it: the root group, exit codes and `main`.

The commands themselves (modelpress.cli.main and what it imports: numpy, the stages,
the formats) load when one runs, so `modelpress --help` and `--version` start in
about the time of `import click`.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
from typing import Any, NamedTuple

import click

from modelpress import __version__

EXIT_FAILURE = 1
EXIT_USAGE = 2
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class Command(NamedTuple):
    """Where a command is defined, and the line `modelpress --help` shows for it."""

    module: str
    short_help: str


# The first line of each command's docstring (tests/test_cli.py checks they agree).
COMMANDS = {
    "compress": Command("modelpress.cli.main",
                        "Compress MODEL into OUT with the stages that follow, applied in order."),
    "inspect": Command("modelpress.cli.restore",
                       "Show every tensor of MODEL: shape, dtype, encoding, bytes stored, zeros."),
    "decompress": Command("modelpress.cli.restore", "Restore every compressed tensor of MODEL to "
                          "dense floats of its original dtype."),
    "sweep": Command("modelpress.cli.sweep",
                     "Compress MODEL with each technique at several settings and compare them."),
}


class LazyCommands(click.Group):
    """A group whose commands are imported when one is run or asked for its help."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        # numpy, the stages and the formats: loaded only when a command runs (start-up time)
        module = importlib.import_module(COMMANDS[name].module)
        return getattr(module, name)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        with formatter.section("Commands"):
            formatter.write_dl([(name, command.short_help) for name, command in COMMANDS.items()])


@click.group(cls=LazyCommands, context_settings=CONTEXT)
@click.version_option(__version__, "-V", "--version", prog_name="modelpress")
def cli() -> None:
    """Compress ONNX models and safetensors weights with an ordered recipe of stages.

    \b
    Examples:
      modelpress compress model.onnx -o small.onnx quantize --bits 8
      modelpress compress model.safetensors -o small.safetensors quantize --bits 4 --group-size 32
      modelpress compress model.onnx -o small.onnx prune --sparsity 0.5 quantize --bits 8
      modelpress compress model.onnx -o small.onnx cast --dtype fp16
      modelpress compress model.onnx -o small.onnx lowrank --rank-ratio 0.25 quantize --bits 4
      modelpress compress model.onnx -o small.onnx prune --sparsity 0.5 cluster --bits 4
      modelpress compress model.onnx -o small.onnx --recipe recipe.yaml
      modelpress inspect small.onnx
      modelpress decompress small.safetensors -o dense.safetensors
      modelpress sweep model.onnx --plot sweep.png

    Exit codes: 0 success, 1 a model could not be read, compressed or written
    (in batch mode: any model failed, the others are still written), 2 usage
    error (bad option or recipe), 3 a --max-error, --max-output-error,
    --min-accuracy or --min-ratio threshold failed (output and report are still written).
    """


def _terminated(signum: int, frame: Any) -> None:
    # Unwind like Ctrl-C does, so temporary output files are removed on the way out.
    raise SystemExit(128 + signum)


def main() -> None:
    """Console entry point; an unexpected error is one line unless MODELPRESS_DEBUG is set."""
    signal.signal(signal.SIGTERM, _terminated)
    try:
        cli.main(prog_name="modelpress")
    except Exception as exc:  # a bug, not a user error: keep it to one line
        if os.environ.get("MODELPRESS_DEBUG"):
            raise
        click.echo(f"Error: internal error: {type(exc).__name__}: {exc} "
                   "(rerun with MODELPRESS_DEBUG=1 for details and please report it)", err=True)
        sys.exit(EXIT_FAILURE)
