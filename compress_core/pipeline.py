"""Apply a recipe to every tensor of a store and measure the weight error."""

from __future__ import annotations

import dataclasses
import fnmatch
import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import numpy as np

from modelpress.core.dtypes import short_name
from modelpress.core.encoded import Dense, Encoded, Quantized
from modelpress.core.errors import ModelpressError, UnsupportedTensorError
from modelpress.core.metrics import EMPTY, ErrorStats, compare
from modelpress.core.recipe import Recipe
from modelpress.core.stage import Skip, Stage
from modelpress.core.store import Progress, TensorStore
from modelpress.core.tensorinfo import TensorInfo

DEFAULT_MIN_ELEMENTS = 4096


@dataclass(frozen=True)
class Options:
    """Run-wide settings that are not part of the recipe.

    Each format's writer settings are that format's own object (an ONNX
    model's OnnxWriteOptions, safetensors' SafetensorsWriteOptions), given to
    its store's writer.
    """

    min_elements: int = DEFAULT_MIN_ELEMENTS
    allow_nonfinite: bool = False
    # Tensors processed at once (threads); None: one per CPU. Output bytes do not
    # depend on it.
    threads: int | None = None
    # An --include/--exclude pattern that matches no tensor of the model stops the
    # run (RecipeError) instead of adding a warning to the report.
    strict: bool = False


# Options that do not change what is written (left out of recipe fingerprints).
RUN_ONLY_OPTIONS = ("threads", "strict")


def default_threads() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass
class Encoding:
    """The outcome of applying a recipe: new encodings and their errors, by tensor name.

    `tensors` is filled by `encode` only; a streaming run (`encode_stream`)
    records the label (`described`) and error of each tensor it yields.
    """

    tensors: dict[str, Encoded] = field(default_factory=dict)
    errors: dict[str, ErrorStats] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    described: dict[str, str] = field(default_factory=dict)
    # Each stage's options as applied to each changed tensor (Stage.resolved_config, with
    # the layouts read from the encoding where the values chose them).
    configs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


def plan(store: TensorStore, recipe: Recipe, options: Options) -> dict[str, list[Stage]]:
    """For each tensor some stage selects, the stages that apply to it, in order."""
    selected: dict[str, list[Stage]] = {}
    for name, info in store.tensors.items():
        stages = [s for s in recipe.stages if s.selects(info, options.min_elements)]
        if stages:
            selected[name] = stages
    return selected


def left_alone(tensors: Mapping[str, TensorInfo], recipe: Recipe, selected: Mapping[str, object],
               options: Options) -> list[str]:
    """A note for each float tensor of at least `min_elements` that the recipe's default
    selection passes over for not being weight-like, with the reason (`TensorInfo.use`)."""
    notes = []
    for name, info in tensors.items():
        if (name in selected or not info.is_float or info.size < options.min_elements
                or info.default_target(options.min_elements)):
            continue
        if not any(not s.include and not any(fnmatch.fnmatchcase(name, p) for p in s.exclude)
                   for s in recipe.stages):
            continue  # every stage names its tensors, or excludes this one
        reason = info.use or (f"it is {len(info.shape)}-D; stages change tensors of 2 or more "
                              "dims unless named" if len(info.shape) < 2
                              else "not used as a weight")
        notes.append(f"{name}: left as is, {info.size:,} elements ({reason}; --include "
                     "with --take-all-named changes it)")
    return notes


def unmatched_patterns(recipe: Recipe, tensors: Mapping[str, TensorInfo]) -> list[str]:
    """What each --include/--exclude pattern that selects nothing does wrong, one line each.

    An --include pattern that names only tensors that are not weight-like
    selects nothing either, unless its stage has take_all_named.
    """
    problems = []
    for stage in recipe.stages:
        for option in ("include", "exclude"):
            for pattern in getattr(stage, option):
                named = [n for n in tensors if fnmatch.fnmatchcase(n, pattern)]
                where = f"{stage.id} --{option} '{pattern}'"
                if not named:
                    problems.append(f"{where} matches no tensor")
                elif option == "include" and not stage.take_all_named and not any(
                        tensors[n].weight_like for n in named):
                    problems.append(f"{where} matches no weight-like tensor (it names "
                                    f"{named[0]!r}{' and others' if len(named) > 1 else ''}; "
                                    "--take-all-named changes those too)")
    return problems


def encode(store: TensorStore, recipe: Recipe, options: Options = Options(),
           progress: Progress | None = None) -> Encoding:
    """Read each selected tensor once, apply its stages, and measure the error.

    Keeps every encoded tensor in memory; writers take `encode_stream` instead.
    """
    result = Encoding()
    for name, encoded in encode_stream(store, recipe, options, progress, result):
        result.tensors[name] = encoded
    return result


def encode_stream(store: TensorStore, recipe: Recipe, options: Options = Options(),
                  progress: Progress | None = None,
                  into: Encoding | None = None,
                  ready: dict[str, Result] | None = None) -> Iterator[tuple[str, Encoded]]:
    """(name, encoded) for each tensor the recipe changes, in the store's order.

    Tensors are encoded by `options.threads` threads (numpy releases the GIL
    in its kernels), at most that many ahead of the consumer, and together at
    most as many input bytes as the largest tensor or IN_FLIGHT_FLOOR (one
    tensor always runs): memory follows the largest tensor, whatever the
    thread count. What is
    yielded does not depend on the thread count. Errors, labels and notes go
    into `into`. `ready`: tensors already encoded (`encode_some`, same recipe and
    options), taken from it, not encoded again (the caller bounds what it holds).
    """
    into = into if into is not None else Encoding()
    selected = plan(store, recipe, options)
    into.notes.extend(left_alone(store.tensors, recipe, selected, options))
    work = _prepare(store, recipe, selected, options)
    threads = max(1, options.threads or default_threads())
    results = _results(store, work, options, threads, ready or {})
    for done, (name, encoded, error, notes) in enumerate(results):
        if progress:
            progress(done, len(work), name)
        into.notes.extend(notes)
        if encoded is not None:
            into.errors[name] = error
            into.described[name] = encoded.describe()
            into.configs[name] = [stage.resolved_config(store.tensors[name], encoded)
                                  for stage in work[name]]
            yield name, encoded
        del encoded  # not held while the consumer asks for the next one
    if progress:
        progress(len(work), len(work), "")


# name, encoding (None: unchanged), its error, notes
Result = tuple[str, "Encoded | None", "ErrorStats | None", list[str]]


def encode_some(store: TensorStore, recipe: Recipe, names: list[str],
                options: Options = Options()) -> dict[str, Result]:
    """The outcomes of `names` (those the recipe changes) under `recipe`, as `encode_stream`
    would give them, for its `ready`. Not for recipes with a stage that looks at all its
    tensors first (`Stage.needs_prepare`): that look would see these tensors only."""
    if any(stage.needs_prepare for stage in recipe.stages):
        raise ValueError("encode_some: the recipe has a stage that needs all its tensors")
    selected = plan(store, recipe, options)
    work = {name: selected[name] for name in names if name in selected}
    threads = max(1, options.threads or default_threads())
    return {result[0]: result for result in _results(store, work, options, threads, {})}


def _results(store: TensorStore, work: dict[str, list[Stage]], options: Options,
             threads: int, ready: dict[str, Result]) -> Iterator[Result]:
    """Each tensor's outcome in work order, computed up to `threads` tensors ahead (taken
    from `ready` where it is there)."""
    def job(name: str, stages: list[Stage]) -> Result:
        if name in ready:
            return ready.pop(name)
        notes: list[str] = []
        try:
            encoded, error = _encode_one(store, store.tensors[name], stages, options, notes)
        except ModelpressError as exc:
            raise type(exc)(f"{store.path}: {exc}") from None
        return name, encoded, error, notes

    if threads == 1 or len(work) <= 1:
        for name, stages in work.items():
            yield job(name, stages)
        return
    sizes = {name: store.tensors[name].nbytes for name in work}
    budget = max(max(sizes.values()), IN_FLIGHT_FLOOR)
    pool = ThreadPoolExecutor(min(threads, len(work)), thread_name_prefix="modelpress")
    pending: deque[tuple[int, Future[Result]]] = deque()
    in_flight = 0
    try:
        for name, stages in work.items():
            while pending and (len(pending) >= threads or in_flight + sizes[name] > budget):
                size, future = pending.popleft()
                in_flight -= size
                yield future.result()
            pending.append((sizes[name], pool.submit(job, name, stages)))
            in_flight += sizes[name]
        while pending:
            yield pending.popleft()[1].result()
    finally:
        # On an error (or a consumer that stops early) queued tensors are dropped
        # and running ones finish before the pool is gone.
        pool.shutdown(wait=True, cancel_futures=True)


def _encode_one(store: TensorStore, info: TensorInfo, stages: list[Stage], options: Options,
                notes: list[str]) -> tuple[Encoded | None, ErrorStats | None]:
    if not info.is_float:
        raise UnsupportedTensorError(
            f"tensor {info.name!r} is {short_name(info.dtype)}; {stages[0].id} only applies to "
            f"floating-point tensors (use --exclude '{info.name}')")
    if info.size == 0:
        notes.append(f"{info.name}: left as is (it has no elements)")
        return None, None
    array = store.read(info.name)
    measured = encode_measured(array, info, stages)
    if measured is not None:
        return measured
    # On the stored dtype: a cast would warn on signalling NaNs (hostile data) and turn
    # finite float64 values beyond float32's range into Inf.
    bad = count_nonfinite(array)
    if bad:
        if options.allow_nonfinite:
            notes.append(f"{info.name}: left as is ({bad} NaN/Inf values, --allow-nonfinite)")
            return None, None
        raise UnsupportedTensorError(
            f"tensor {info.name!r} has {bad} NaN/Inf values; fix the model, exclude it "
            f"(--exclude '{info.name}'), or pass --allow-nonfinite to leave such tensors as they are")
    if array.dtype.itemsize > 4 and array.size and np.abs(array).max() > np.finfo(np.float32).max:
        raise UnsupportedTensorError(
            f"tensor {info.name!r} holds values beyond float32's range (up to "
            f"{float(np.abs(array).max()):.3g}); stages compute in float32, so exclude it "
            f"(--exclude '{info.name}')")
    encoded = _apply_stages(Dense(array), info, stages, notes, array)
    if isinstance(encoded, Dense) and encoded.array is array:
        return None, None
    return encoded, measure_error(array, encoded)


def encode_measured(array: np.ndarray, info: TensorInfo,
                    stages: list[Stage]) -> tuple[Encoded, ErrorStats] | None:
    """A lone stage's encoding of `array` and its error, from the stage's measuring
    kernel (`Stage.encode_measured`); None to apply the stages, then measure."""
    if len(stages) != 1:
        return None
    return stages[0].encode_measured(array, info)


# Input bytes of the tensors in flight at once (see encode_stream): those of the
# largest tensor, or IN_FLIGHT_FLOOR if that is more, so models of many equal
# tensors of moderate size still use every thread.
IN_FLIGHT_FLOOR = 128 * 2**20

# Elements decoded at a time when a quantized tensor's error is measured.
_DECODE_CHUNK = 1 << 20
# Quantized fields `measure_error` knows how to slice; others must be unset.
_SLICED_FIELDS = {"codes", "scale", "zero_point", "bits", "granularity", "channel_axis",
                  "block_axis", "group_size", "block_span"}


def measure_error(reference: np.ndarray, encoded: Encoded) -> ErrorStats:
    """The error of `encoded` against `reference`, without a whole decoded copy if it can.

    A quantized tensor is decoded a slab of rows (axis 0) at a time; its
    scales slice along with the codes. Other trees are decoded whole.
    """
    rows = _row_step(encoded)
    if rows is None or reference.ndim == 0:
        return compare(reference, encoded.decode())
    total = EMPTY
    for start in range(0, reference.shape[0], rows):
        stop = start + rows
        part = {"codes": encoded.codes[start:stop]}
        for key in ("scale", "zero_point"):
            value = getattr(encoded, key)
            if value is None or value.shape[0] == 1:
                continue  # shared by every row
            if encoded.granularity == "group" and encoded.block_axis == 0:
                part[key] = value[start // encoded.group_size:-(-stop // encoded.group_size)]
            else:  # one per row (channel axis 0, or groups along another axis)
                part[key] = value[start:stop]
        slab = dataclasses.replace(encoded, **part)
        total = total + compare(reference[start:stop], slab.decode())
    return total


def _row_step(encoded: Encoded) -> int | None:
    """Rows per slab for `measure_error`, or None to decode whole."""
    if type(encoded) is not Quantized or encoded.codes.ndim == 0:
        return None
    extra = [f.name for f in dataclasses.fields(encoded) if f.name not in _SLICED_FIELDS]
    if any(getattr(encoded, name) is not None for name in extra):
        return None  # a field this slicing does not know (e.g. coded scales): decode whole
    grouped_rows = encoded.granularity == "group" and encoded.block_axis == 0
    if grouped_rows and encoded.block_span > 1:
        return None  # groups run across rows and the axes after them
    for value in (encoded.scale, encoded.zero_point):
        if value is not None and value.ndim and value.shape[0] not in (
                1, encoded.codes.shape[0]) and not grouped_rows:
            return None
    per_row = max(1, encoded.codes[:1].size)
    rows = max(1, _DECODE_CHUNK // per_row)
    if encoded.granularity == "group" and encoded.block_axis == 0:
        rows = max(1, rows // encoded.group_size) * encoded.group_size
    return rows


# Elements checked at a time by count_nonfinite (its temporaries stay in cache).
_CHECK_CHUNK = 1 << 18


def count_nonfinite(array: np.ndarray) -> int:
    """NaN and Inf values in a float array, counted a chunk at a time.

    bfloat16 is checked on its bits (all exponent bits set), which is several
    times faster than ml_dtypes' isfinite and needs no cast.
    """
    flat = array.reshape(-1)
    bits = flat.view(np.uint16) if flat.dtype.name == "bfloat16" else None
    bad = 0
    for start in range(0, flat.size, _CHECK_CHUNK):
        if bits is not None:
            chunk = bits[start:start + _CHECK_CHUNK] & np.uint16(0x7F80)
            bad += int(np.count_nonzero(chunk == np.uint16(0x7F80)))
        else:
            bad += int(np.count_nonzero(~np.isfinite(flat[start:start + _CHECK_CHUNK])))
    return bad


def _apply_stages(encoded: Encoded, info: TensorInfo, stages: list[Stage],
                  notes: list[str] | None, original: np.ndarray | None = None) -> Encoded:
    for stage in stages:
        try:
            encoded = (stage.apply(encoded, info) if original is None
                       else stage.apply_to(encoded, info, original))
        except Skip as reason:
            if notes is not None:
                notes.append(f"{info.name}: {stage.id} left it as is ({reason})")
    return encoded


def _prepare(store: TensorStore, recipe: Recipe, work: dict[str, list[Stage]],
             options: Options) -> dict[str, list[Stage]]:
    """Let stages that need a look at all their tensors first (global pruning) take it.

    Each such stage sees its tensors as the stages before it leave them, and
    is replaced in the work list by the prepared stage that `prepare` returns.
    """
    for stage in recipe.stages:
        if not stage.needs_prepare:
            continue
        names = [n for n, stages in work.items() if any(s is stage for s in stages)]

        def tensors(names: list[str] = names, stage: Stage = stage):
            for name in names:
                info = store.tensors[name]
                if not info.is_float or info.size == 0:
                    continue  # the main pass reports these
                array = store.read(name)
                if not np.isfinite(array).all():
                    continue
                stages = work[name]
                before = stages[:next(i for i, s in enumerate(stages) if s is stage)]
                yield info, _apply_stages(Dense(array), info, before, None).decode()

        try:
            ready = stage.prepare(tensors)
        except ModelpressError as exc:
            raise type(exc)(f"{store.path}: {exc}") from None
        work = {n: [ready if s is stage else s for s in stages] for n, stages in work.items()}
    return work
