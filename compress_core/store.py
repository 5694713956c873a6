"""What the pipeline needs from a model file; `formats` provides the implementations."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Collection, Iterable, Iterator, Mapping, Protocol, Tuple, TypeVar, Union

import numpy as np

from modelpress.core.encoded import Encoded
from modelpress.core.tensorinfo import TensorInfo

Progress = Callable[[int, int, str], None]
"""progress(done, total, what): called as work advances."""


@dataclass
class WriteResult:
    """What a writer wrote: bytes per changed tensor, the file size, and notes."""

    tensor_bytes: dict[str, int]
    file_bytes: int
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class WriteOptions:
    """One format's writer settings. Each format defines its own subclass (ONNX:
    external data, kernel forms; safetensors: shard size); callers build the one
    for the store's format and pass it to `TensorStore.write` untouched."""


W = TypeVar("W", bound=WriteOptions)


def options_for(kind: type[W], options: WriteOptions | None, what: str) -> W:
    """`options` as one format's writer settings (None: that format's defaults); another
    format's settings are a caller's bug, not a user's."""
    if options is None:
        return kind()
    if not isinstance(options, kind):
        raise TypeError(f"{what} written with {kind.__name__}, not {type(options).__name__}")
    return options


class TensorStore(Protocol):
    """A model opened for reading, one tensor at a time: what the pipeline, the
    writers and the application use of it."""

    path: Path
    """Where the model is: a local path, or (modelpress.formats.url.ObjectPath) an object
    in storage with the same name, suffix, parent and `/`."""
    format: str
    sharded: bool
    """True for a checkpoint of several files written as shards plus an index."""
    encodings: Mapping[str, dict[str, Any]]
    """The spec of each tensor stored in a modelpress encoding, by its original name."""

    @property
    def tensors(self) -> Mapping[str, TensorInfo]:
        """Every tensor in file order."""

    @property
    def data_files(self) -> Collection[Path]:
        """Files besides `path` that hold tensors (ONNX external data, shards)."""

    @property
    def file_bytes(self) -> int:
        """Size of the model on disk, external data included."""

    def read(self, name: str) -> np.ndarray:
        """One tensor's data."""

    def decode(self, name: str) -> Encoded:
        """The encoded tree of a tensor stored in a modelpress encoding."""

    def logical_tensors(self) -> Iterator[tuple[str, TensorInfo, Encoded | None, int]]:
        """Tensors as the original model had them: (name, info, encoding or None if
        stored plainly, bytes stored)."""

    def calibrate(self, calibration: Path, selected: set[str]) -> list[str]:
        """Attach input statistics (`TensorInfo.input_stats`) from a file of model inputs
        to the tensors among `selected` that can use them; notes for the report.
        Raises InputDataError for a format that cannot run its model."""

    def write(self, dst: Path, encoded: EncodedItems, progress: Progress | None = None, *,
              metadata: Mapping[str, str] | None = None,
              options: WriteOptions | None = None) -> WriteResult:
        """Write the model with `encoded` tensors replaced, atomically, in this format.

        `encoded` may be a stream of (name, encoded) pairs in the store's
        tensor order: writers take one at a time, so memory stays bounded.
        `metadata` entries are added to the output's metadata; `options` are
        this format's writer settings (None: the defaults).
        """


EncodedItems = Union[Mapping[str, Encoded], Iterable[Tuple[str, Encoded]]]
"""Encoded tensors for a writer: a mapping, or (name, encoded) pairs in the store's order,
which a writer consumes one at a time (see `in_store_order`)."""


def in_store_order(names: Iterable[str],
                   encoded: EncodedItems) -> Iterator[tuple[str, Encoded | None]]:
    """(name, encoded or None) for every tensor of `names`, pulling `encoded` lazily.

    Pairs must come in the order of `names`; a pair out of order or for an
    unknown tensor raises ValueError (a bug in the caller, not a user error).
    """
    names = list(names)
    if isinstance(encoded, Mapping):
        pairs: Iterator[tuple[str, Encoded]] = iter([(n, encoded[n]) for n in names
                                                     if n in encoded])
        known = set(names)
        unknown = [n for n in encoded if n not in known]
        if unknown:
            raise ValueError(f"encoded tensor {unknown[0]!r} is not in the model")
    else:
        pairs = iter(encoded)
    pending = next(pairs, None)
    for name in names:
        if pending is not None and pending[0] == name:
            item, pending = pending[1], None
            yield name, item
            # Let go of a written tensor before the next one is made.
            item = None
            pending = next(pairs, None)
        else:
            yield name, None
    if pending is not None:
        raise ValueError(f"encoded tensor {pending[0]!r} is not in the model or out of order")
