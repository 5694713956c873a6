"""Apply a recipe to every tensor of a store and measure the weight error."""

from __future__ import annotations

from dataclasses import dataclass, field

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
    # ONNX only: the form of quantized MatMul/Gemm weights (formats.onnx_sites.OnnxTarget).
    onnx_target: str = "standard"
    onnx_int4: str = "auto"
    accuracy_level: int = 4


@dataclass
class Encoding:
    """The outcome of applying a recipe: new encodings and their errors, by tensor name."""

    tensors: dict[str, Encoded] = field(default_factory=dict)
    errors: dict[str, ErrorStats] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


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
    """Read each selected tensor once, apply its stages, and measure the error."""
    work = plan(store, recipe, options)
    result = Encoding()
    work = _prepare(store, recipe, work, options)
    for done, (name, stages) in enumerate(work.items()):
        if progress:
            progress(done, len(work), name)
        info = store.tensors[name]
        try:
            encoded, error = _encode_one(store, info, stages, options, result.notes)
        except ModelpressError as exc:
            raise type(exc)(f"{store.path}: {exc}") from None
        if encoded is not None:
            result.tensors[name] = encoded
            result.errors[name] = error
    if progress:
        progress(len(work), len(work), "")
    return result


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
