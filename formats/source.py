"""Model files read by byte ranges: what the readers need, wherever the file is.

A reader asks for a file's size, a few bytes (a header), one tensor as an
array, or a range copied into an output. A local file maps the tensor's range
(`filedata.map_range`: pages from the page cache, freed with the array) and
copies in the kernel; an object in storage answers each with ranged GETs
(`objectstore.RemoteFile`), so a model streams tensor by tensor from either,
and only one tensor is in memory at a time.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

import numpy as np

from modelpress.formats.filedata import copy_range, map_range
from modelpress.formats.location import AnyPath, ObjectPath, storage

# Bytes per read when a range is streamed (copied, hashed) through this process.
CHUNK = 1 << 24


class ByteSource(Protocol):
    """A file read by byte ranges."""

    path: AnyPath
    """Where it is: the path or URL that messages name."""

    @property
    def size(self) -> int:
        """Bytes in the file."""

    def read(self, offset: int, length: int) -> bytes:
        """`length` bytes from `offset` (fewer only at the end of the file)."""

    def array(self, offset: int, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        """A read-only array of `shape` elements of `dtype` stored at `offset`."""

    def copy_to(self, offset: int, length: int, out: BinaryIO) -> None:
        """Append `length` bytes from `offset` to the unbuffered file `out`; EOFError if the
        file is shorter."""


@dataclass(frozen=True)
class LocalFile:
    """A file on a local disk: tensors mapped, ranges copied by the kernel."""

    path: Path

    @property
    def size(self) -> int:
        return self.path.stat().st_size

    def read(self, offset: int, length: int) -> bytes:
        with open(self.path, "rb") as fh:
            fh.seek(offset)
            return fh.read(length)

    def array(self, offset: int, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        return map_range(self.path, offset, dtype, shape)

    def copy_to(self, offset: int, length: int, out: BinaryIO) -> None:
        copy_range(self.path, offset, length, out)


@dataclass(frozen=True)
class MemoryFile:
    """A file already read whole (an ONNX model from storage, parsed in memory)."""

    path: AnyPath
    data: bytes = field(repr=False, compare=False)

    @property
    def size(self) -> int:
        return len(self.data)

    def read(self, offset: int, length: int) -> bytes:
        return self.data[offset:offset + length]

    def array(self, offset: int, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        dtype = np.dtype(dtype)
        count = math.prod(shape)
        if offset + count * dtype.itemsize > len(self.data):
            raise ValueError(f"{count * dtype.itemsize} bytes at {offset} pass the end of the "
                             f"file ({len(self.data)} bytes)")
        return np.frombuffer(self.data, dtype=dtype, count=count, offset=offset).reshape(shape)

    def copy_to(self, offset: int, length: int, out: BinaryIO) -> None:
        chunk = memoryview(self.data)[offset:offset + length]
        if len(chunk) < length:
            raise EOFError(f"ended {length - len(chunk)} bytes early")
        written = 0
        while written < len(chunk):
            written += out.write(chunk[written:])


def open_source(path: AnyPath | str | os.PathLike) -> ByteSource:
    """The file at a path, or the object at a URL (its size is asked once, here)."""
    if isinstance(path, ObjectPath):
        return storage().RemoteFile.open(path)
    return LocalFile(Path(path))


__all__ = ["ByteSource", "CHUNK", "LocalFile", "MemoryFile", "open_source"]
