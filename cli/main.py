"""`modelpress`: compress, inspect and decompress model files."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path
from typing import Any, Callable

import click

from modelpress import __version__
from modelpress.core.errors import ModelpressError, RecipeError
from modelpress.core.pipeline import DEFAULT_MIN_ELEMENTS, Options
from modelpress.core.recipe import Recipe

from modelpress.cli import evaluation
from modelpress.cli.batch import BATCH_ONLY, is_batch, run_batch_command, shard_option, size_option
from modelpress.cli.chain import StageChain
from modelpress.cli.stages import stage_commands

EXIT_FAILURE = 1
EXIT_USAGE = 2
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class Failure(click.ClickException):
    """A model that cannot be read or written, or a stage that cannot apply (exit 1)."""

    exit_code = EXIT_FAILURE


class RecipeUsageError(click.ClickException):
    """A recipe file that is not valid (exit 2, like any other usage error)."""

    exit_code = EXIT_USAGE


def _consoles(quiet: bool) -> tuple[Any, Any]:
    from rich.console import Console
    out = Console(soft_wrap=False, width=None if sys.stdout.isatty() else 160)
    err = Console(stderr=True, quiet=quiet)
    return out, err


def _progress(err_console: Any, quiet: bool) -> tuple[Any, Callable[[int, int, str], None] | None]:
    """A rich progress bar on stderr when a person is watching, else nothing."""
    if quiet or not err_console.is_terminal:
        return None, None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
    bar = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   console=err_console, transient=True)
    task = bar.add_task("compressing", total=None)

    def update(done: int, total: int, what: str) -> None:
        bar.update(task, completed=done, total=total, description=what[:60] or "done")
    return bar, update


@click.group(context_settings=CONTEXT)
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


@cli.group(cls=StageChain, chain=True, invoke_without_command=True,
           subcommand_metavar="STAGE [STAGE OPTIONS]... [STAGE ...]", context_settings=CONTEXT)
@click.argument("model", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), metavar="OUT",
              help="Output file, in the input's format (.onnx, .safetensors, or "
                   "*.safetensors.index.json for a sharded checkpoint); in batch mode the "
                   "output folder.")
@click.option("--recipe", "recipe_file", type=click.Path(path_type=Path), metavar="FILE",
              help="Read the stages from a YAML or JSON recipe instead of the command line.")
@click.option("--print-recipe", is_flag=True,
              help="Print the recipe (YAML) this command line means, and exit.")
@click.option("--min-elements", type=click.IntRange(1), default=DEFAULT_MIN_ELEMENTS,
              show_default=True,
              help="Smallest tensor stages change unless it is named with --include.")
@click.option("--allow-nonfinite", is_flag=True,
              help="Leave tensors holding NaN/Inf as they are instead of stopping.")
@click.option("--report", "report_path", type=click.Path(path_type=Path), metavar="FILE.json",
              help="Also write every number, the recipe, threshold outcomes, tool and "
                   "library versions and input/output sha256 to this JSON file.")
@click.option("--format", "fmt", type=click.Choice(["table", "json", "markdown"]),
              default="table", show_default=True, help="What to print on stdout.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no table.")
@click.option("--max-shard-size", type=str, callback=size_option, metavar="SIZE",
              help="Sharded safetensors: cut output shards of at most SIZE (5GB, 500MB, 2GiB) "
                   "instead of keeping the input's shards.")
@click.option("--threads", type=click.IntRange(1), metavar="N",
              help="Tensors compressed at once (threads) [default: CPU count; in batch mode "
                   "the CPUs are shared among jobs]. The output does not depend on it.")
@click.option("--external-data", type=click.Choice(["auto", "always", "never"]),
              default="auto", show_default=True,
              help="ONNX: write weights to OUT.data beside OUT. auto: when the input (with its "
                   "data files) is 512 MiB or more, or the output would pass protobuf's "
                   "2 GB limit.")
@click.option("--onnx-target", type=click.Choice(["standard", "ort"]), default="standard",
              show_default=True,
              help="ONNX: 4-bit MatMul/Gemm weights as standard DequantizeLinear (onnxruntime "
                   "fuses it into its 4-bit kernel), or ort: com.microsoft.MatMulNBits "
                   "written directly (onnxruntime only).")
@click.option("--onnx-int4", type=click.Choice(["auto", "kernel", "fold"]), default="auto",
              show_default=True,
              help="ONNX: which 4-bit MatMul/Gemm weights use onnxruntime's 4-bit kernel: "
                   "auto: matrices of 4M+ weights (faster there; smaller ones run faster as "
                   "float32); kernel: all that can (least memory); fold: none (decoded once "
                   "at load).")
@click.option("--onnx-int8", type=click.Choice(["auto", "kernel", "fold"]), default="auto",
              show_default=True,
              help="ONNX: which 5- to 8-bit MatMul/Gemm weights use onnxruntime's 8-bit "
                   "kernel (one byte per weight in memory, int8 activations): auto: matrices "
                   "of 1M+ weights in groups of 64+; kernel: all that can; fold: none "
                   "(decoded to float32 at load: exact float math, 4 bytes per weight).")
@click.option("--accuracy-level", type=click.IntRange(0, 4), default=4, show_default=True,
              help="With --onnx-target ort: MatMulNBits accuracy_level (0: float math, "
                   "exact; 4: int8 activations, faster). The standard form follows the "
                   "session option session.qdq_matmulnbits_accuracy_level (default 4).")
@click.option("--calibration", type=click.Path(path_type=Path), metavar="FILE.npz",
              help="ONNX: inputs (arrays by input name, like --inputs) run through the original "
                   "model first, for quantized MatMul/Gemm weights whose inputs are never "
                   "negative (after ReLU, Sigmoid, Softmax, comparisons, or pooling of those: "
                   "classifier heads, one-hot features). Their codes then round so that the "
                   "error's mean offset on each output cancels where that helps; sizes do not "
                   "change. Needs onnxruntime. Use data other than --inputs, or the output "
                   "error is measured on the data it was fitted to.")
@click.option("-j", "--jobs", type=click.IntRange(1), metavar="N",
              help="Batch: models compressed in parallel processes [default: CPU count, "
                   "bounded by available memory].")
@click.option("--skip-existing", is_flag=True,
              help="Batch: skip models whose output exists and was made by the same recipe "
                   "from the same input (recorded in the output).")
@click.option("--fail-fast", is_flag=True,
              help="Batch: stop at the first failure (pending models are not started).")
@click.option("--shard", type=str, callback=shard_option, metavar="K/N",
              help="Batch: process only the K-th of N slices of the models (for N parallel "
                   "CI jobs).")
@click.option("--dry-run", is_flag=True,
              help="Batch: list what would be done, with estimated sizes; write nothing.")
@evaluation.input_options
@evaluation.threshold_options
def compress(**_: Any) -> None:
    """Compress MODEL into OUT with the stages that follow, applied in order.

    Each stage changes only weight-like tensors (floating point, 2-D or more,
    --min-elements or more; in ONNX, weight inputs of MatMul, Gemm, Conv,
    ConvTranspose and Gather) unless --include names others. Run
    `modelpress compress STAGE --help` for a stage's options.

    \b
    Stages: quantize, cast, prune, lowrank, cluster. An order that cannot
    work on a tensor (such as cluster then prune) stops with a message that
    says what works instead (here: prune then cluster).

    \b
    Examples:
      modelpress compress mlp.onnx -o mlp-int8.onnx quantize --bits 8
      modelpress compress mlp.onnx -o out.onnx quantize --bits 4 --group-size 32
      modelpress compress big.onnx -o out.onnx --onnx-target ort quantize --bits 4
      modelpress compress mlp.onnx -o out.onnx prune --sparsity 0.5 quantize --bits 8
      modelpress compress w.safetensors -o w4.safetensors quantize --bits 4 --scheme asym
      modelpress compress mlp.onnx -o half.onnx cast --dtype fp16
      modelpress compress w.safetensors -o w8.safetensors cast --dtype fp8-e4m3 --scale channel
      modelpress compress mlp.onnx -o out.onnx prune --pattern 2:4 quantize --bits 4
      modelpress compress mlp.onnx -o out.onnx prune --sparsity 0.7 --scope global
      modelpress compress mlp.onnx -o out.onnx lowrank --rank-ratio 0.25 quantize --bits 8
      modelpress compress mlp.onnx -o out.onnx prune --sparsity 0.5 cluster --bits 4
      modelpress compress mlp.onnx -o out.onnx --recipe recipe.yaml --report report.json
      modelpress compress mlp.onnx -o out.onnx --print-recipe quantize --bits 4
      modelpress compress mlp.onnx -o out.onnx --inputs x.npz --labels y.npy quantize --bits 4
      modelpress compress cnn.onnx -o out.onnx --calibration calib.npz quantize --bits 4
      modelpress compress mlp.onnx -o out.onnx --max-output-error 0.05 --format markdown quantize

    \b
    ONNX models are run before and after in onnxruntime (CPU) on the same inputs:
    per-output relative error, cosine, max abs error, top-1 agreement, accuracy
    with --labels, and median latency on this machine. --no-eval skips this.
    Exit codes: 0 success, 1 failure, 2 usage error, 3 a threshold failed
    (the output and --report are still written; the failed threshold is named).

    \b
    Batch (a folder, several MODELs, or an existing folder as OUT): every
    .onnx, .safetensors and sharded checkpoint (*.safetensors.index.json) is
    compressed into the same place under OUT; other files are copied. Batch
    runs report weight errors (the models are not run); exit 1 if any model
    failed (the others are still written).
      modelpress compress models/ -o out/ --jobs 4 quantize --bits 4
      modelpress compress models/ -o out/ --skip-existing --shard 2/4 quantize
      modelpress compress a.onnx b.onnx -o out/ --dry-run quantize --bits 4

    \b
    Recipe file (YAML or JSON, same names as the options):
      version: 1
      stages:
        - {id: prune, sparsity: 0.5}
        - {id: quantize, bits: 8, granularity: channel}
    """


for _command in stage_commands().values():
    compress.add_command(_command)


@compress.result_callback()
def _run_compress(stages: list[Any], model: tuple[Path, ...], output: Path | None,
                  recipe_file: Path | None, print_recipe: bool, min_elements: int,
                  allow_nonfinite: bool, report_path: Path | None, fmt: str, quiet: bool,
                  max_shard_size: int | None, threads: int | None, external_data: str,
                  onnx_target: str, onnx_int4: str, onnx_int8: str, accuracy_level: int,
                  calibration: Path | None, **extra: Any) -> None:
    threshold_values = evaluation.pop(extra, evaluation.THRESHOLD_PARAMS)
    limits = evaluation.thresholds_from(threshold_values)
    eval_values = evaluation.pop(extra, evaluation.INPUT_PARAMS)
    batch_flags = extra
    recipe = _recipe(stages, recipe_file)
    if print_recipe:
        click.echo(recipe.to_yaml(), nl=False)
        return
    if output is None:
        raise click.UsageError("missing option '-o' / '--output'")
    if is_batch(model, output):
        single = [_SINGLE_ONLY.get(k, "--" + k.replace("_", "-"))
                  for k, v in {**threshold_values, **eval_values}.items()
                  if v not in (None, False, ()) and k != "no_eval"]
        if calibration is not None:
            single.append("--calibration")
        if single:
            raise click.UsageError(f"{single[0]} applies to one model at a time; batch mode "
                                   "reports weight errors and does not run the models")
        options = Options(min_elements=min_elements, allow_nonfinite=allow_nonfinite,
                          max_shard_size=max_shard_size, threads=threads,
                          external_data=external_data, onnx_target=onnx_target,
                          onnx_int4=onnx_int4, onnx_int8=onnx_int8,
                          accuracy_level=accuracy_level)
        failure = run_batch_command(model, output, recipe, options, batch_flags, report_path,
                                    fmt, quiet)
        if failure:
            raise Failure(failure)
        return
    given = [f"--{k.replace('_', '-')}" for k in BATCH_ONLY if batch_flags.get(k)]
    if given:
        raise click.UsageError(f"{given[0]} applies to batch mode: give a folder or several "
                               "MODELs with -o OUTDIR")
    check_extra_outputs([("--report", report_path)],
                        [(model[0], "the input model"), (output, "the output model"),
                         *read_paths(eval_values, recipe_file, calibration)])
    from modelpress.app.api import compress as run

    settings = evaluation.settings_from(eval_values, model[0], limits)
    # A quiet run that prints no table needs no console (nor rich's import time).
    show = not quiet or fmt != "table"
    out, err = _consoles(quiet) if show else (None, None)
    bar, update = _progress(err, quiet) if err is not None else (None, None)
    before = _identity(output)
    try:
        baseline = evaluation.prepare(model[0], settings)
        if bar is not None:
            bar.start()
        report = run(model[0], output, recipe,
                     Options(min_elements=min_elements, allow_nonfinite=allow_nonfinite,
                             max_shard_size=max_shard_size, threads=threads,
                             external_data=external_data, onnx_target=onnx_target,
                             onnx_int4=onnx_int4, onnx_int8=onnx_int8,
                             accuracy_level=accuracy_level,
                             calibration=None if calibration is None else str(calibration)),
                     update)
    except ModelpressError as exc:
        raise Failure(str(exc)) from None
    except KeyboardInterrupt:
        _interrupted(output, before)
    finally:
        if bar is not None:
            bar.stop()
    try:
        # The sha256 digests appear only in JSON (--report, --format json).
        evaluation.finish(report, baseline, limits,
                          digests=report_path is not None or fmt == "json")
        if report_path is not None:
            from modelpress.cli.render import dump_json
            dump_json(report_path, report.as_dict())
        if show:
            from modelpress.cli.render import print_report
            print_report(out, report, fmt)
    except KeyboardInterrupt:
        _interrupted(output, before)
    evaluation.raise_on_breach(report)


class Interrupted(click.ClickException):
    """Ctrl-C after the output was complete: say so (exit 130, as for SIGINT)."""

    exit_code = 128 + signal.SIGINT


def _identity(path: Path) -> tuple[int, int, int] | None:
    """Which file is at `path` now (device, inode, mtime), or None."""
    try:
        found = path.stat()
    except OSError:
        return None
    return found.st_dev, found.st_ino, found.st_mtime_ns


def _interrupted(output: Path, before: tuple[int, int, int] | None) -> None:
    """Ctrl-C: if this run already renamed its output into place (a new file is there; an
    output is renamed only when complete), say it is written; else abort as usual."""
    now = _identity(output)
    if now is not None and now != before and not output.is_dir():
        raise Interrupted(f"interrupted after {output} was written completely; the table, "
                          "--report, evaluation and threshold checks did not run") from None
    raise KeyboardInterrupt


def check_extra_outputs(paths: list[tuple[str, Path | None]],
                        protected: list[tuple[Path, str]]) -> None:
    """Refuse a --report (or --plot) path that would overwrite a file the run reads or
    writes, or that cannot be written at all (checked before any work starts)."""
    from modelpress.formats import same_file
    from modelpress.formats.outputs import output_files
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
        files.append((other, what))
        if what in ("the input model", "the output model"):
            from modelpress.formats.onnx.write import data_name
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


# Options of a single-model run that batch mode does not take (it does not run the models).
_SINGLE_ONLY = {"inputs_path": "--inputs", "labels_path": "--labels", "dims": "--dim",
                "input_ranges": "--input-range", "max_input_bytes": "--max-input-size"}


def _recipe(stages: list[Any], recipe_file: Path | None) -> Recipe:
    if recipe_file is not None and stages:
        raise click.UsageError("give stages on the command line or --recipe FILE, not both")
    if recipe_file is not None:
        try:
            return Recipe.load(recipe_file)
        except RecipeError as exc:
            raise RecipeUsageError(str(exc)) from None
    if not stages:
        raise click.UsageError("no stages given; add one, e.g. `quantize --bits 8`, "
                               "or use --recipe FILE")
    return Recipe(stages)


@cli.command(context_settings=CONTEXT)
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table",
              show_default=True, help="What to print on stdout.")
def inspect(model: Path, fmt: str) -> None:
    """Show every tensor of MODEL: shape, dtype, encoding, bytes stored, zeros.

    \b
    Examples:
      modelpress inspect sample_models/mlp.onnx
      modelpress inspect small.safetensors --format json
    """
    from modelpress.app.api import inspect as run
    from modelpress.cli.render import print_inspect
    try:
        report = run(model)
    except ModelpressError as exc:
        raise Failure(str(exc)) from None
    out, _ = _consoles(quiet=False)
    print_inspect(out, report, fmt)


@cli.command(context_settings=CONTEXT)
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, metavar="OUT",
              help="Output file, in the input's format.")
def decompress(model: Path, output: Path) -> None:
    """Restore every compressed tensor of MODEL to dense floats of its original dtype.

    \b
    Examples:
      modelpress decompress small.safetensors -o dense.safetensors
      modelpress decompress small.onnx -o dense.onnx
    """
    from modelpress.app.api import decompress as run
    try:
        result = run(model, output)
    except ModelpressError as exc:
        raise Failure(str(exc)) from None
    click.echo(f"{output}: {result.file_bytes} bytes, {len(result.tensor_bytes)} tensors restored")
    for note in result.notes:
        click.echo(f"note: {note}")


from modelpress.cli.sweep import sweep as _sweep  # noqa: E402  (registered after the other commands)

cli.add_command(_sweep)


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
