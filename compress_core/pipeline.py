"""Apply a recipe to every tensor of a store and measure the weight error."""

from __future__ import annotations

import os
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np

from .dtypes import short_name
from .encoded import Dense, Encoded
from .errors import ModelpressError, UnsupportedTensorError
from .metrics import ErrorStats, compare
from .recipe import Recipe
from .stage import Skip, Stage
from .store import Progress, TensorStore
from .tensorinfo import TensorInfo

DEFAULT_MIN_ELEMENTS = 4096


@dataclass(frozen=True)
class Options:
    """Run-wide settings that are not part of the recipe."""

    min_elements: int = DEFAULT_MIN_ELEMENTS
    allow_nonfinite: bool = False
    # Sharded safetensors checkpoints only: cut output shards of at most this
    # many bytes instead of keeping the input's shards.
    max_shard_size: int | None = None
    # Tensors processed at once (threads); None: one per CPU. Output bytes do not
    # depend on it.
    threads: int | None = None
    # ONNX only: "auto" writes weights as external data when the input (with its
    # data files) has 512 MiB or more or the output would pass protobuf's 2 GB
    # limit; "always", "never" (see formats.onnx_write).
    external_data: str = "auto"
    # ONNX only: the form of quantized MatMul/Gemm weights (formats.onnx_sites.OnnxTarget).
    onnx_target: str = "standard"
    onnx_int4: str = "auto"
    accuracy_level: int = 4


# Options that do not change what is written (left out of recipe fingerprints).
RUN_ONLY_OPTIONS = ("threads",)


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


def plan(store: TensorStore, recipe: Recipe, options: Options) -> dict[str, list[Stage]]:
    """For each tensor some stage selects, the stages that apply to it, in order."""
    selected: dict[str, list[Stage]] = {}
    for name, info in store.tensors.items():
        stages = [s for s in recipe.stages if s.selects(info, options.min_elements)]
        if stages:
            selected[name] = stages
    return selected


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
                  into: Encoding | None = None) -> Iterator[tuple[str, Encoded]]:
    """(name, encoded) for each tensor the recipe changes, in the store's order.

    Tensors are encoded by `options.threads` threads (numpy releases the GIL
    in its kernels), at most that many ahead of the consumer, so at most
    threads + 1 tensors are in memory at once; what is yielded does not
    depend on the thread count. Errors, labels and notes go into `into`.
    """
    into = into if into is not None else Encoding()
    work = _prepare(store, recipe, plan(store, recipe, options), options)
    threads = max(1, options.threads or default_threads())
    for done, (name, encoded, error, notes) in enumerate(_results(store, work, options, threads)):
        if progress:
            progress(done, len(work), name)
        into.notes.extend(notes)
        if encoded is not None:
            into.errors[name] = error
            into.described[name] = encoded.describe()
            yield name, encoded
        del encoded  # not held while the consumer asks for the next one
    if progress:
        progress(len(work), len(work), "")


Result = tuple[str, "Encoded | None", "ErrorStats | None", list[str]]


def _results(store: TensorStore, work: dict[str, list[Stage]], options: Options,
             threads: int) -> Iterator[Result]:
    """Each tensor's outcome in work order, computed up to `threads` tensors ahead."""
    def job(name: str, stages: list[Stage]) -> Result:
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
    pool = ThreadPoolExecutor(min(threads, len(work)), thread_name_prefix="modelpress")
    pending: deque[Future[Result]] = deque()
    try:
        for name, stages in work.items():
            if len(pending) >= threads:
                yield pending.popleft().result()
            pending.append(pool.submit(job, name, stages))
        while pending:
            yield pending.popleft().result()
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
    # On the stored dtype: a cast would warn on signalling NaNs (hostile data) and turn
    # finite float64 values beyond float32's range into Inf.
    bad = int(np.count_nonzero(~np.isfinite(array)))
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
    encoded = _apply_stages(Dense(array), info, stages, notes)
    if isinstance(encoded, Dense) and encoded.array is array:
        return None, None
    return encoded, compare(array, encoded.decode())


def _apply_stages(encoded: Encoded, info: TensorInfo, stages: list[Stage],
                  notes: list[str] | None) -> Encoded:
    for stage in stages:
        try:
            encoded = stage.apply(encoded, info)
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
