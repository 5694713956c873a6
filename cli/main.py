"""`modelpress`: compress, inspect and decompress model files."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import click

import modelpress
from modelpress.app import api
from modelpress.core.errors import ModelpressError, RecipeError
from modelpress.core.pipeline import DEFAULT_MIN_ELEMENTS, Options
from modelpress.core.order import order_problem
from modelpress.core.quantize.stage import gptq_refusal
from modelpress.core.quantize.static import latency_notes, static_refusal, static_stage
from modelpress.core.recipe import Recipe
from modelpress.formats.onnx.options import (ACCURACY_LEVELS, EXTERNAL_DATA_MODES, INT4_MODES,
                                             INT8_MODES, TARGETS, OnnxTarget, OnnxWriteOptions)
from modelpress.formats.safetensors.options import SafetensorsWriteOptions

from modelpress.cli import budget, evaluation
from modelpress.cli.batch import BATCH_ONLY, is_batch, run_batch_command, shard_option
from modelpress.cli.chain import StageChain
from modelpress.cli.common import (PATH_OR_URL, Failure, RecipeUsageError, check_extra_outputs,
                                   read_paths, size_option)
from modelpress.cli.entry import CONTEXT
from modelpress.cli.render import dump_json, print_report
from modelpress.cli.stages import stage_commands
from modelpress.cli.terminal import consoles, progress


@click.group(cls=StageChain, chain=True, invoke_without_command=True,
           subcommand_metavar="STAGE [STAGE OPTIONS]... [STAGE ...]", context_settings=CONTEXT)
@click.argument("model", nargs=-1, required=True, type=PATH_OR_URL)
@click.option("-o", "--output", type=PATH_OR_URL, metavar="OUT",
              help="Output file, in the input's format (.onnx, .safetensors, or "
                   "*.safetensors.index.json for a sharded checkpoint); in batch mode the "
                   "output folder. MODEL and OUT may be URLs (s3://bucket/key).")
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
@click.option("--external-data", type=click.Choice(EXTERNAL_DATA_MODES),
              default="auto", show_default=True,
              help="ONNX: write weights to OUT.data beside OUT. auto: when the input (with its "
                   "data files) is 512 MiB or more, or the output would pass protobuf's "
                   "2 GB limit.")
@click.option("--onnx-target", type=click.Choice(TARGETS), default="standard",
              show_default=True,
              help="ONNX: 4-bit MatMul/Gemm weights as standard DequantizeLinear (onnxruntime "
                   "fuses it into its 4-bit kernel), or ort: com.microsoft.MatMulNBits "
                   "written directly (onnxruntime only).")
@click.option("--onnx-int4", type=click.Choice(INT4_MODES), default="auto",
              show_default=True,
              help="ONNX: which 4-bit MatMul/Gemm weights use onnxruntime's 4-bit kernel: "
                   "auto: matrices of 4M+ weights (faster there; smaller ones run faster as "
                   "float32); kernel: all that can (least memory); fold: none (decoded once "
                   "at load).")
@click.option("--onnx-int8", type=click.Choice(INT8_MODES), default="auto",
              show_default=True,
              help="ONNX: which 5- to 8-bit MatMul/Gemm weights use onnxruntime's 8-bit "
                   "kernel (one byte per weight in memory, int8 activations): auto: matrices "
                   "of 1M+ weights in groups of 64+; kernel: all that can; fold: none "
                   "(decoded to float32 at load: exact float math, 4 bytes per weight).")
@click.option("--accuracy-level", type=click.IntRange(min(ACCURACY_LEVELS), max(ACCURACY_LEVELS)),
              default=4, show_default=True,
              help="With --onnx-target ort: MatMulNBits accuracy_level (0: float math, "
                   "exact; 4: int8 activations, faster). The standard form follows the "
                   "session option session.qdq_matmulnbits_accuracy_level (default 4).")
@click.option("--calibration", type=click.Path(path_type=Path), metavar="FILE.npz",
              help="ONNX: inputs (arrays by input name, like --inputs; 32-128 samples are "
                   "typical) run through the original model first, collecting the input "
                   "statistics of each quantized MatMul, Gemm and Conv weight. quantize then "
                   "rounds those weights by GPTQ (--method gptq, the default with this option): "
                   "lower output error, same layout and size. Needs onnxruntime. Use data "
                   "other than --inputs, or the output error is measured on the data it was "
                   "fitted to.")
@click.option("--time-kernels/--no-time-kernels", default=True, show_default=True,
              help="With quantize --activations int8: time each integer kernel against its "
                   "float form on this machine and keep float those clearly slower. The "
                   "choice follows this machine's timings; --no-time-kernels decides by "
                   "output error alone (the same file on every run and machine).")
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
@click.option("--executor", type=click.Choice(["local", "dask"]),
              help="Batch: where the models run: local (this machine's processes, the default) "
                   "or dask (one task per model on a Dask cluster; needs modelpress[dask]).")
@click.option("--scheduler", metavar="ADDRESS",
              help="Batch with --executor dask: join the cluster of this scheduler "
                   "(tcp://host:8786) instead of starting a local one.")
@click.option("--strict", is_flag=True,
              help="Stop (exit 2) when an --include or --exclude pattern matches no tensor "
                   "of a model, instead of warning.")
@budget.target_options
@evaluation.input_options
@evaluation.threshold_options
def compress(**_: Any) -> None:
    """Compress MODEL into OUT with the stages that follow, applied in order.

    Each stage changes only weight-like tensors (floating point, 2-D or more,
    --min-elements or more; in ONNX, weight inputs of MatMul, Gemm, Conv,
    ConvTranspose and Gather). --include narrows them by name (any size);
    with --take-all-named it takes every tensor it names. Run
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
      modelpress compress m.onnx -o out.onnx --calibration calib.npz --inputs eval.npz \
          quantize --bits 4 --method gptq
      modelpress compress mlp.onnx -o out.onnx --max-output-error 0.05 --format markdown quantize
      modelpress compress cnn.onnx -o out.onnx --target-size 20% --calibration calib.npz
      modelpress compress cnn.onnx -o o.onnx --target-error 0.02 --calibration c.npz quantize --bits 3-8
      modelpress compress cnn.onnx -o int8.onnx --calibration c.npz quantize --bits 8 --activations int8

    \b
    A target chooses each tensor's precision: a quantize --bits width (a range
    A-B, default 2-8; quantize is added if not given), fp16 or as it is; other
    stages stay as given. --print-recipe prints the choice as a recipe.

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
      modelpress compress models/ -o out/ --executor dask --scheduler tcp://host:8786 quantize
      modelpress compress s3://zoo/models -o s3://zoo/int4 quantize --bits 4

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
                  calibration: Path | None, strict: bool, time_kernels: bool,
                  **extra: Any) -> None:
    target = budget.target_from(evaluation.pop(extra, budget.TARGET_PARAMS))
    threshold_values = evaluation.pop(extra, evaluation.THRESHOLD_PARAMS)
    limits = evaluation.thresholds_from(threshold_values)
    eval_values = evaluation.pop(extra, evaluation.INPUT_PARAMS)
    batch_flags = extra
    recipe = _recipe(stages, recipe_file, allow_none=target is not None)
    static = static_stage(recipe.stages) is not None
    if static:  # its --target-error bounds the activations kept float, not a budget search
        refusal = static_refusal(recipe.stages, calibration=calibration is not None,
                                 onnx=model[0].suffix.lower() == ".onnx",
                                 batch=output is not None and is_batch(model, output),
                                 target_size=target is not None and target.size is not None)
        if refusal:
            raise RecipeUsageError(refusal)
    options = Options(min_elements=min_elements, allow_nonfinite=allow_nonfinite,
                      threads=threads, strict=strict)
    onnx_options = OnnxWriteOptions(external_data, OnnxTarget(onnx_target, onnx_int4,
                                                              accuracy_level, onnx_int8))
    safetensors_options = SafetensorsWriteOptions(max_shard_size)
    search = None if static else budget.searcher(
        target, model, output, recipe, recipe_file, calibration, eval_values, options,
        (onnx_options, safetensors_options))
    if print_recipe:
        click.echo(recipe.to_yaml() if search is None else budget.recipe_text(
            search(None), calibration), nl=False)
        return
    if output is None:
        raise click.UsageError("missing option '-o' / '--output'")
    batch = is_batch(model, output)
    refusal = gptq_refusal(recipe.stages, calibration=calibration is not None, batch=batch,
                           onnx=model[0].suffix.lower() == ".onnx")
    if refusal:
        raise RecipeUsageError(refusal)
    if batch:
        single = [_SINGLE_ONLY.get(k, "--" + k.replace("_", "-"))
                  for k, v in {**threshold_values, **eval_values}.items()
                  if v not in (None, False, ()) and k != "no_eval"]
        if calibration is not None:
            single.append("--calibration")
        if single:
            raise click.UsageError(f"{single[0]} applies to one model at a time; batch mode "
                                   "reports weight errors and does not run the models")
        found = None if search is None else search(None)  # one model directory
        failure = run_batch_command(model, output, found.recipe if found else recipe, options,
                                    batch_flags, report_path, fmt, quiet,
                                    onnx_options=onnx_options,
                                    safetensors_options=safetensors_options)
        if failure:
            raise Failure(failure)
        if found and not quiet:
            click.echo("\n".join(f"note: {line}" for line in budget.summary(found)))
        return
    given = [f"--{k.replace('_', '-')}" for k in BATCH_ONLY if batch_flags.get(k)]
    if given:
        raise click.UsageError(f"{given[0]} applies to batch mode: give a folder or several "
                               "MODELs with -o OUTDIR")
    check_extra_outputs([("--report", report_path)],
                        [(model[0], "the input model"), (output, "the output model"),
                         *read_paths(eval_values, recipe_file, calibration)])
    settings = evaluation.settings_from(eval_values, model[0], limits, output)
    # A quiet run that prints no table needs no console (nor rich's import time).
    show = not quiet or fmt != "table"
    out, err = consoles(quiet) if show else (None, None)
    bar, update = progress(err, quiet)
    before = _identity(output)
    try:
        baseline = evaluation.prepare(model[0], settings)
        if bar is not None:
            bar.start()
        found = None if search is None else search(update)
        recipe = recipe if found is None else found.recipe
        # The public name loads onnx and onnxruntime on first use, only for this stage.
        report = modelpress.compress_static(
            model[0], output, recipe, calibration, external_data=external_data, progress=update,
            target_error=None if target is None else target.error,
            time_kernels=time_kernels) if static else api.compress(
                model[0], output, recipe, options, update, onnx_options=onnx_options,
                safetensors_options=safetensors_options,
                calibration=None if calibration is None else str(calibration))
    except RecipeError as exc:  # --strict: a pattern that matches nothing is a usage error
        raise RecipeUsageError(str(exc)) from None
    except ModelpressError as exc:
        raise Failure(str(exc)) from None
    except KeyboardInterrupt:
        _interrupted(output, before)
    finally:
        if bar is not None:
            bar.stop()
    if found is not None:
        budget.attach(report, found)
    try:
        # The sha256 digests appear only in JSON (--report, --format json).
        evaluation.finish(report, baseline, limits,
                          digests=report_path is not None or fmt == "json")
        if static:
            report.notes.extend(latency_notes(report))
        if report_path is not None:
            dump_json(report_path, report.as_dict())
        if show:
            print_report(out, report, fmt)
    except KeyboardInterrupt:
        _interrupted(output, before)
    evaluation.raise_on_breach(report)


class Interrupted(click.ClickException):
    """Ctrl-C after the output was complete: say so (exit 130, as for SIGINT)."""

    exit_code = 128 + signal.SIGINT


def _identity(path: Any) -> tuple[int, int, int] | None:
    """Which local file is at `path` now (device, inode, mtime), or None."""
    if not isinstance(path, Path):
        return None
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


# Options of a single-model run that batch mode does not take (it does not run the models).
_SINGLE_ONLY = {"inputs_path": "--inputs", "labels_path": "--labels", "dims": "--dim",
                "input_ranges": "--input-range", "max_input_bytes": "--max-input-size"}


def _recipe(stages: list[Any], recipe_file: Path | None, allow_none: bool = False) -> Recipe:
    if recipe_file is not None and stages:
        raise click.UsageError("give stages on the command line or --recipe FILE, not both")
    if recipe_file is not None:
        try:
            recipe = Recipe.load(recipe_file)
        except RecipeError as exc:
            raise RecipeUsageError(str(exc)) from None
        _check_order(recipe)
        return recipe
    if not stages and not allow_none:  # a target adds a quantize stage
        raise click.UsageError("no stages given; add one, e.g. `quantize --bits 8`, "
                               "or use --recipe FILE")
    recipe = Recipe(stages)
    _check_order(recipe)
    return recipe


def _check_order(recipe: Recipe) -> None:
    """Refuse an order of stages that cannot work (a usage error, before any model is read)."""
    problem = order_problem(recipe.stages)
    if problem is not None:
        raise click.UsageError(problem)
