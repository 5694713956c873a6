"""The `inspect` and `decompress` commands: what a compressed model holds, and its dense form."""

from __future__ import annotations

from pathlib import Path

import click

from modelpress.app import api
from modelpress.app.directory import decompress_directory, model_in
from modelpress.core.errors import ModelpressError
from modelpress.formats.location import is_dir, is_remote

from modelpress.cli.common import PATH_OR_URL, Failure
from modelpress.cli.entry import CONTEXT
from modelpress.cli.render import print_inspect
from modelpress.cli.terminal import consoles


@click.command(context_settings=CONTEXT)
@click.argument("model", type=PATH_OR_URL)
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table",
              show_default=True, help="What to print on stdout.")
def inspect(model: Path, fmt: str) -> None:
    """Show every tensor of MODEL: shape, dtype, encoding, bytes stored, zeros.

    \b
    Examples:
      modelpress inspect sample_models/mlp.onnx
      modelpress inspect small.safetensors --format json
      modelpress inspect s3://bucket/models/small.safetensors
    """
    try:
        report = api.inspect(model if is_remote(model) else model_in(model))
    except ModelpressError as exc:
        raise Failure(str(exc)) from None
    out, _ = consoles(quiet=False)
    print_inspect(out, report, fmt)


@click.command(context_settings=CONTEXT)
@click.argument("model", type=PATH_OR_URL)
@click.option("-o", "--output", type=PATH_OR_URL, required=True, metavar="OUT",
              help="Output file, in the input's format (a path or an object storage URL).")
def decompress(model: Path, output: Path) -> None:
    """Restore every compressed tensor of MODEL to dense floats of its original dtype.

    A folder (a Hugging Face model directory, a sharded checkpoint) is written
    as a folder: each model decompressed, config.json without its
    compressed-tensors quantization_config (so transformers loads it as a
    dense model), every other file copied.

    \b
    Examples:
      modelpress decompress small.safetensors -o dense.safetensors
      modelpress decompress small.onnx -o dense.onnx
      modelpress decompress bert-int8/ -o bert-dense/
      modelpress decompress s3://bucket/out/small.onnx -o s3://bucket/dense/small.onnx
    """
    if is_remote(model) or is_remote(output):
        if is_dir(model):
            raise Failure(f"{model}: a folder; to or from object storage decompress takes one "
                          "model file (give the .onnx, .safetensors or .safetensors.index.json)")
    elif model.is_dir():
        _decompress_directory(model, output)
        return
    try:
        result = api.decompress(model, output)
    except ModelpressError as exc:
        raise Failure(str(exc)) from None
    click.echo(f"{output}: {result.file_bytes} bytes, {len(result.tensor_bytes)} tensors restored")
    for note in result.notes:
        click.echo(f"note: {note}")


def _decompress_directory(model: Path, output: Path) -> None:
    try:
        result = decompress_directory(model, output)
    except ModelpressError as exc:
        raise Failure(str(exc)) from None
    for rel, written in result.models.items():
        click.echo(f"{output / rel}: {written.file_bytes} bytes, "
                   f"{len(written.tensor_bytes)} tensors restored")
    click.echo(f"{output}: {len(result.copied)} other files written (config.json without "
               "quantization_config, the rest copied)")
    for note in result.notes:
        click.echo(f"note: {note}")
