"""The contract every stage follows (the registry of stages is `modelpress.core.registry`).

A stage is a frozen dataclass: its fields are its options, with the same names
in the CLI (`group_size` is `--group-size`), in recipe files and in Python.
Field metadata (help, choices, bounds) is the one definition the CLI options
and the constructor's validation are both derived from. A stage also carries
its own hooks, so that the pipeline, the size estimate and the order checks
name no stage: `estimate_size` (bits per element, for --dry-run),
`encode_measured` (a kernel that measures its error as it encodes), and
`produces` and `refusals` (the node types it makes, and why it cannot take
a tensor another stage has made into a given node type).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import typing
from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable

import numpy as np

from modelpress.core.encoded import Encoded
from modelpress.core.errors import RecipeError
from modelpress.core.metrics import ErrorStats
from modelpress.core.sizing import ElementSize
from modelpress.core.tensorinfo import TensorInfo

TensorValues = Callable[[], Iterable[tuple[TensorInfo, np.ndarray]]]
"""A re-iterable source of (info, float32 values) for every tensor a stage selects."""


class Skip(Exception):
    """Raised by `Stage.apply` to leave a tensor as it is; the message is the reason.

    The pipeline records the reason as a note of the report and goes on with
    the next stage, so `lowrank ... quantize` still quantizes a tensor that
    low-rank factors would not make smaller.
    """


def option(default: Any, help: str, *, choices: tuple[str, ...] | None = None,
           min: float | None = None, max: float | None = None,
           min_open: bool = False, max_open: bool = False,
           metavar: str | None = None) -> Any:
    """Declare a stage option: its default, help text and allowed values."""
    meta = {"help": help, "choices": choices, "min": min, "max": max,
            "min_open": min_open, "max_open": max_open, "metavar": metavar}
    if isinstance(default, tuple):
        return dataclasses.field(default_factory=lambda: default, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# The options every stage has (its first fields): which tensors it changes. Left out of a
# stage's config when unset, listed after the stage's own options.
SELECTION_OPTIONS = ("include", "exclude", "take_all_named")
SELECTION = len(SELECTION_OPTIONS)


def cli_name(field_name: str) -> str:
    """The command-line spelling of an option: group_size -> --group-size."""
    return "--" + field_name.replace("_", "-")


@dataclass(frozen=True)
class Stage:
    """A compression stage: maps an encoded tensor to a new one."""

    id: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    # The node types `apply` makes (compose.order_error: a stage that makes a mask or
    # factors judges the whole tensor, one that makes a leaf the leaf inside them).
    produces: ClassVar[tuple[type[Encoded], ...]] = ()
    # Node type -> why this stage cannot follow the stage that made it, and what works.
    refusals: ClassVar[dict[type[Encoded], str]] = {}

    include: tuple[str, ...] = option((), "only tensors whose name matches this glob (repeatable)",
                                      metavar="GLOB")
    exclude: tuple[str, ...] = option((), "skip tensors whose name matches this glob (repeatable)",
                                      metavar="GLOB")
    take_all_named: bool = option(
        False, "with --include: change every tensor it names, also ones that are not "
        "weight-like (biases, norms, scalars; in ONNX, initializers that are no MatMul, Gemm, "
        "Conv or Gather weight); without it --include narrows the weight-like tensors")

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            value = _coerce(type(self), f, value)
            object.__setattr__(self, f.name, value)
        self.validate()

    def validate(self) -> None:
        """Cross-option checks; raise RecipeError naming the options."""

    def fail(self, message: str) -> None:
        raise RecipeError(f"{self.id}: {message}")

    # -- configuration -------------------------------------------------------

    def get_config(self) -> dict[str, Any]:
        """JSON-safe options with the stage id, stage options first."""
        config: dict[str, Any] = {"id": self.id}
        names = [f.name for f in dataclasses.fields(self)]
        for name in names[SELECTION:] + names[:SELECTION]:
            value = getattr(self, name)
            if name in SELECTION_OPTIONS and not value:
                continue
            config[name] = list(value) if isinstance(value, tuple) else value
        return config

    def resolved_config(self, info: TensorInfo, encoded: Encoded | None = None) -> dict[str, Any]:
        """`get_config` with every option left to its default resolved for one tensor.

        Options whose default depends on the tensor (its format, role or shape)
        override this; the others resolve in `validate`. `encoded`, when given,
        is the tensor's encoding after all its stages: options chosen from the
        values (quantize's 8-bit group size in ONNX) are read from it.
        """
        return self.get_config()

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Stage:
        """Build this stage from a config mapping (with or without its id).

        `modelpress.core.registry.stage_from_config` picks the class by the id.
        """
        config = dict(config)
        config.pop("id", None)
        klass = cls
        known = {f.name for f in dataclasses.fields(klass)}
        for key in config:
            if key not in known:
                allowed = ", ".join(sorted(known))
                raise RecipeError(f"{klass.id}: unknown option {key!r}; allowed: {allowed}")
        return klass(**config)

    # -- work ----------------------------------------------------------------

    def selects(self, info: TensorInfo, min_elements: int) -> bool:
        """Whether this stage changes the tensor described by `info`."""
        if any(fnmatch.fnmatchcase(info.name, pat) for pat in self.exclude):
            return False
        if self.include:
            # Named tensors need no size; they are still weight-like unless take_all_named.
            return (self.take_all_named or info.weight_like) and any(
                fnmatch.fnmatchcase(info.name, pat) for pat in self.include)
        return info.default_target(min_elements)

    @property
    def needs_prepare(self) -> bool:
        """True when this stage must see every tensor it selects before changing any."""
        return False

    def prepare(self, tensors: TensorValues) -> Stage:
        """The stage ready for one run, given all its tensors (see `needs_prepare`).

        `tensors()` may be iterated more than once; each pass reads the tensors
        again, so only one is held in memory at a time. The returned stage
        carries what the pass found (e.g. a global threshold); this one is not
        changed.
        """
        return self

    @abstractmethod
    def apply(self, encoded: Encoded, info: TensorInfo) -> Encoded:
        """Return the new encoding of one tensor; never modify the input."""

    def apply_to(self, encoded: Encoded, info: TensorInfo, original: np.ndarray) -> Encoded:
        """`apply`, told the tensor's values as read: for a stage that fits its result to
        them rather than to what the stages before it left (GPTQ after prune feeds back
        the pruned weights' error). `apply` by default."""
        return self.apply(encoded, info)

    def encode_measured(self, array: np.ndarray,
                        info: TensorInfo) -> tuple[Encoded, ErrorStats] | None:
        """`apply` on the dense tensor `array` as read, and its error against `array`,
        by a kernel that measures as it encodes; None to take the general path
        (apply, then measure), which also reports NaN/Inf.

        The encoding must be the one `apply` gives, byte for byte.
        """
        return None

    def estimate_size(self, size: ElementSize, info: TensorInfo) -> ElementSize | None:
        """The estimated bits per element after this stage, given those before it
        (from the header alone); None when it depends on the data."""
        return None


def _coerce(klass: type[Stage], f: dataclasses.Field, value: Any) -> Any:
    """Check one option's value against its declaration; return it normalised."""
    meta = f.metadata
    label = f"{klass.id}: {cli_name(f.name)}"
    kind = option_type(klass, f.name)
    args = [a for a in typing.get_args(kind) if a is not type(None)]
    base = args[0] if args and typing.get_origin(kind) is not tuple else kind
    if value is None:
        if type(None) in typing.get_args(kind):
            return None
        raise RecipeError(f"{label} needs a value")
    if typing.get_origin(kind) is tuple:
        if isinstance(value, str):
            value = (value,)
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise RecipeError(f"{label} takes a list of strings, got {value!r}")
        return tuple(value)
    if base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{label} takes an integer, got {value!r}")
    elif base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise RecipeError(f"{label} takes a number, got {value!r}")
        value = float(value)
    elif base is str:
        if not isinstance(value, str):
            raise RecipeError(f"{label} takes a string, got {value!r}")
    elif base is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{label} takes true or false, got {value!r}")
    if meta.get("choices") and value not in meta["choices"]:
        raise RecipeError(f"{label} must be one of {', '.join(meta['choices'])}, got {value!r}")
    lo, hi = meta.get("min"), meta.get("max")
    if lo is not None and (value < lo or (meta["min_open"] and value == lo)):
        raise RecipeError(f"{label} must be {'>' if meta['min_open'] else '>='} {lo}, got {value}")
    if hi is not None and (value > hi or (meta["max_open"] and value == hi)):
        raise RecipeError(f"{label} must be {'<' if meta['max_open'] else '<='} {hi}, got {value}")
    return value


def option_type(klass: type[Stage], name: str) -> Any:
    """The declared type of a stage option (e.g. int | None)."""
    return typing.get_type_hints(klass)[name]
