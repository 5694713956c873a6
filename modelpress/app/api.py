"""The Python API: the same operations as the command line."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from modelpress.core.dtypes import short_name
from modelpress.core.encoded import Encoded
from modelpress.core.errors import InputDataError, ModelReadError, ModelWriteError, RecipeError
from modelpress.core.pipeline import (Encoding, Options, Result, encode_some, encode_stream, plan,
                                      unmatched_patterns)
from modelpress.core.quantize.gptq import rounding_notes
from modelpress.core.quantize.stage import Quantize, gptq_refusal
from modelpress.core.recipe import Recipe
from modelpress.core.report import InspectReport, InspectRow, Report, TensorRow
from modelpress.core.store import Progress, TensorStore, WriteOptions, WriteResult
from modelpress.formats import check_output_path, open_model, write_decompressed
from modelpress.formats.location import AnyPath, ObjectPath, is_dir, location
from modelpress.formats.outputs import local_output
from modelpress.formats.onnx.options import OnnxWriteOptions
from modelpress.formats.safetensors.ct_config import for_loaders as loader_recipe
from modelpress.formats.safetensors.ct_config import loader_form, loader_notes
from modelpress.formats.safetensors.options import SafetensorsWriteOptions


def compress(src: str | os.PathLike | ObjectPath, dst: str | os.PathLike | ObjectPath,
             recipe: Recipe,
             options: Options = Options(), progress: Progress | None = None, *,
             metadata: Mapping[str, str] | None = None,
             onnx_options: OnnxWriteOptions = OnnxWriteOptions(),
             safetensors_options: SafetensorsWriteOptions = SafetensorsWriteOptions(),
             calibration: str | os.PathLike | None = None,
             for_loaders: bool = False) -> Report:
    """Compress the model at `src` with `recipe` and write it to `dst`.

    The output has the input's format; `src` is never modified and `dst`
    appears only when complete. Either may be a URL of object storage
    (s3://bucket/key, see modelpress.formats.objectstore): the input is then
    read by ranges, and the output made locally and uploaded whole. A sharded safetensors checkpoint is given by
    its `*.safetensors.index.json` (or its folder) and written as shards plus
    an index at `dst`. `metadata` adds string entries to the output's
    metadata (ONNX metadata_props, safetensors `__metadata__`, or the index's
    metadata). Tensors stream from reader to writer, `options.threads` at a
    time: memory follows the largest tensors, not the model. `for_loaders`
    says that the model is the weights of a Hugging Face model directory,
    written with its config.json: it is then compressed in forms that
    transformers loads (modelpress.formats.safetensors.ct_config), and the
    report's notes say what that changed.

    The writer of the model's format gets its settings untouched: `onnx_options`
    for an ONNX model, `safetensors_options` for safetensors weights.
    `calibration` (ONNX only) is an .npz of model inputs run through the
    original model: quantized MatMul/Gemm/Conv weights whose quantize stage
    leaves --method unset (or sets gptq) are then rounded by GPTQ with their
    inputs' statistics (see modelpress.core.quantize.gptq).
    """
    src, dst = location(src), location(dst)
    refusal = gptq_refusal(recipe.stages, calibration=calibration is not None,
                           onnx=str(src).lower().endswith(".onnx"))
    if refusal:
        raise RecipeError(refusal)
    store = open_model(src)
    dst = _sharded_destination(store, dst)
    check_output_path(store, dst)
    if store.encodings:
        raise ModelReadError(f"{src}: already compressed by modelpress ({len(store.encodings)} "
                             "tensors); run `modelpress decompress` on it first")
    writer: WriteOptions = onnx_options if store.format == "onnx" else safetensors_options
    encoding = Encoding()
    unmatched = unmatched_patterns(recipe, store.tensors)
    if unmatched and options.strict:
        raise RecipeError(f"{src}: {unmatched[0]} (see the model's tensors with `modelpress "
                          "inspect`; without --strict this is a warning)")
    encoding.notes.extend(f"warning: {u}; that option changed nothing" for u in unmatched)
    applied = recipe
    if for_loaders and store.format == "safetensors":
        applied, notes = loader_recipe(recipe, store.tensors, options.min_elements)
        encoding.notes.extend(notes)
    else:
        for_loaders = False
    ready: dict[str, Result] = {}   # tensors the in-order calibration already rounded
    if calibration is not None:
        if store.format != "onnx":
            raise InputDataError(f"--calibration {calibration}: needs an ONNX model "
                                 f"(it runs the model; {src} holds weights only)")
        quantized = {name for name, stages in plan(store, recipe, options).items()
                     if any(isinstance(stage, Quantize) for stage in stages)}
        encoding.notes.extend(store.calibrate(Path(calibration), quantized))
        ready = _in_order(store, applied, options, Path(calibration), encoding.notes, progress)
    stream = encode_stream(store, applied, options, progress, encoding, ready)
    pruned: list[str] = []
    try:
        with local_output(dst) as local:
            result = store.write(local, _loader_stream(stream, pruned) if for_loaders else stream,
                                 progress, metadata=dict(metadata) if metadata else None,
                                 options=writer)
            if for_loaders:
                encoding.notes.extend(loader_notes(open_model(local).encodings, bool(pruned)))
    finally:
        stream.close()
    if safetensors_options.max_shard_size is not None and not store.sharded:
        encoding.notes.append("--max-shard-size applies to sharded checkpoints only; "
                              "this model is written as one file")
    rows = []
    stages_of = plan(store, applied, options)
    if calibration is not None:
        encoding.notes.extend(rounding_notes(
            [(name, store.tensors[name], stage.plan(store.tensors[name]))
             for name in encoding.described for stage in stages_of[name]
             if isinstance(stage, Quantize) and stage.method in (None, "gptq")]))
    for name, label in encoding.described.items():
        info = store.tensors[name]
        if name not in result.tensor_bytes:
            raise ModelWriteError(f"{dst}: writer did not report tensor {name!r}")
        rows.append(TensorRow(name=name, shape=info.shape, dtype=short_name(info.dtype),
                              encoding=label, bytes_before=info.nbytes,
                              bytes_after=result.tensor_bytes[name],
                              error=encoding.errors[name], stages=encoding.configs[name]))
    return Report(input_path=str(src), output_path=str(dst), format=store.format,
                  recipe=recipe.get_config(), rows=rows, file_bytes_before=store.file_bytes,
                  file_bytes_after=result.file_bytes, notes=encoding.notes + result.notes,
                  applied=_applied(recipe, applied, stages_of, rows))


def _in_order(store: TensorStore, recipe: Recipe, options: Options, calibration: Path,
              notes: list[str], progress: Progress | None) -> dict[str, Result]:
    """Sequential calibration (modelpress.formats.onnx.sequential) of the tensors that a
    quantize stage rounds by gptq with --sequential: the outcomes of those it rounded
    before the run's own pass, for `encode_stream`'s `ready` (progress: each segment)."""
    stages_of = plan(store, recipe, options)
    ordered = {name for name, stages in stages_of.items() for stage in stages
               if isinstance(stage, Quantize) and stage.sequential and stage.activations is None
               and stage.plan(store.tensors[name]).method == "gptq"}
    if not ordered:
        return {}
    if any(stage.needs_prepare for stage in recipe.stages):
        notes.append("--calibration: sequential: not done (a stage looks at all its tensors "
                     "first, e.g. global pruning); each layer is rounded on the original "
                     "model's inputs")
        return {}
    ready: dict[str, Result] = {}

    def round_tensors(names: list[str]) -> dict[str, np.ndarray]:
        if progress:
            progress(len(ready), len(stages_of), f"in order: {names[0]}")
        done = encode_some(store, recipe, names, options)
        ready.update(done)
        return {name: encoded.decode().astype(np.float32)
                for name, encoded, _, _ in done.values() if encoded is not None}

    notes.extend(store.calibrate_in_order(calibration, list(stages_of), ordered, round_tensors))
    return ready


def _applied(recipe: Recipe, applied: Recipe, stages_of: Mapping[str, list[Any]],
             rows: list[TensorRow]) -> dict[str, Any]:
    """The recipe with each option as applied: the value every changed tensor got, or a
    mapping {tensor: value} where they differ. A stage that changed nothing keeps its own."""
    stages = []
    for given, used in zip(recipe.stages, applied.stages):
        configs = {row.name: row.stages[stages_of[row.name].index(used)] for row in rows
                   if used in stages_of[row.name]}
        config = given.get_config()
        for key in config:
            values = {name: c.get(key) for name, c in configs.items()} if key not in (
                "include", "exclude") else {}
            distinct = {repr(v) for v in values.values()}
            if len(distinct) == 1:
                config[key] = next(iter(values.values()))
            elif len(distinct) > 1:
                config[key] = values
        stages.append(config)
    return {**recipe.get_config(), "stages": stages}


def _loader_stream(stream: Iterator[tuple[str, Encoded]],
                   pruned: list[str]) -> Iterator[tuple[str, Encoded]]:
    """`stream` in the forms a model directory stores; the pruned tensors' names go to `pruned`."""
    for name, encoded in stream:
        stored = loader_form(encoded)
        if stored is not encoded:
            pruned.append(name)
        yield name, stored


def decompress(src: str | os.PathLike | ObjectPath,
               dst: str | os.PathLike | ObjectPath) -> WriteResult:
    """Write `src` with every compressed tensor restored to its original dense dtype
    (either may be a URL of object storage, as for `compress`)."""
    src, dst = location(src), location(dst)
    store = open_model(src)
    dst = _sharded_destination(store, dst)
    check_output_path(store, dst)
    with local_output(dst) as local:
        result = write_decompressed(store, local)
    if not store.encodings:
        result.notes.append(f"{src}: no modelpress-compressed tensors; wrote an unchanged copy")
    return result


def _sharded_destination(store: TensorStore, dst: AnyPath) -> AnyPath:
    """A sharded checkpoint written to a folder keeps its index's name there."""
    if store.sharded and is_dir(dst):
        return dst / store.path.name
    return dst


def inspect(path: str | os.PathLike) -> InspectReport:
    """Every tensor of a model: shape, dtype, bytes stored, encoding and sparsity."""
    store = open_model(path)
    rows = []
    for name, info, encoded, stored in store.logical_tensors():
        if encoded is None:
            values = store.read(name) if info.is_float or info.dtype.kind in "iub" else None
            encoding = short_name(info.dtype)
        else:
            values, encoding = encoded.decode(), encoded.describe()
        with np.errstate(invalid="ignore"):  # signalling NaNs in hostile data
            zeros = None if values is None or values.size == 0 else float(
                np.count_nonzero(values == 0) / values.size)
        rows.append(InspectRow(name=name, shape=info.shape, dtype=short_name(info.dtype),
                               stored_bytes=stored, encoding=encoding, zero_fraction=zeros,
                               weight_like=info.weight_like))
    return InspectReport(path=str(path), format=store.format, file_bytes=store.file_bytes,
                         rows=rows)
