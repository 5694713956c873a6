"""Streaming safetensors output: tensor bytes spilled to disk until the header can be written.

A safetensors file starts with a header that lists every tensor's offsets,
so nothing of the body can go into place before the last tensor is known.
Holding every compressed tensor in memory until then would make peak memory
follow the model. Instead each tensor's bytes go to an anonymous spill file
in the destination folder as soon as they are made (the file has no name, so
nothing is left behind if the process dies); tensors copied unchanged from
the input are only recorded. Once all are known, the output is assembled:
header, then the bytes in alignment order (widest element first, stable, as
`safetensors` itself writes), copied by the kernel from the spill or the
input. The result is byte for byte what writing from memory gives.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterable

import numpy as np

from modelpress.core.errors import ModelWriteError

from modelpress.formats.atomic import atomic_path
from modelpress.formats.filedata import copy_range, write_array
from modelpress.formats.safetensors.header import dtype_code, encode_header
from modelpress.formats.source import ByteSource

Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class Slot:
    """One stored tensor: its header fields and where its bytes are (spill or a file)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    itemsize: int
    offset: int
    source: ByteSource | None = None  # None: the spill file


class Spill:
    """The body of one or more safetensors outputs, in arrival order, on disk."""

    def __init__(self, dst: Path) -> None:
        self.dst = Path(dst)
        try:
            self._file: BinaryIO = tempfile.TemporaryFile(dir=self.dst.parent, buffering=0)
        except OSError as exc:
            raise self._failed(exc) from None
        self._size = 0

    def _failed(self, exc: OSError) -> ModelWriteError:
        return ModelWriteError(f"{self.dst}: cannot write the output ({exc.strerror or exc}); "
                               "nothing was written")

    def __enter__(self) -> Spill:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def close(self) -> None:
        """Discard the spilled bytes."""
        self._file.close()

    def add_array(self, name: str, array: np.ndarray) -> Slot:
        """Spill an array's bytes now; the array may be freed afterwards."""
        array = np.asarray(array)
        slot = Slot(name, dtype_code(array.dtype), tuple(array.shape), array.nbytes,
                    array.dtype.itemsize, self._size)
        try:
            self._size += write_array(self._file, array)
        except OSError as exc:  # disk full, quota
            raise self._failed(exc) from None
        return slot

    @staticmethod
    def add_copy(name: str, source: ByteSource, offset: int, dtype: str,
                 shape: tuple[int, ...], nbytes: int, itemsize: int) -> Slot:
        """Record a tensor whose bytes are copied unchanged from `source` at assembly."""
        return Slot(name, dtype, tuple(shape), nbytes, itemsize, offset, source)

    def assemble(self, out: BinaryIO, slots: Iterable[Slot], metadata: dict[str, str],
                 progress: Progress | None = None) -> None:
        """Write a complete safetensors file of `slots` (widest dtype first, stable) to `out`."""
        ordered = sorted(slots, key=lambda s: -s.itemsize)
        header = encode_header([(s.name, s.dtype, s.shape, s.nbytes) for s in ordered], metadata)
        written = 0
        while written < len(header):
            written += out.write(header[written:])
        for i, run in enumerate(_runs(ordered)):
            if progress:
                progress(i, len(ordered), f"writing {run[0].name}")
            first, length = run[0], sum(s.nbytes for s in run)
            try:
                if first.source is None:
                    copy_range(self._file, first.offset, length, out)
                else:
                    first.source.copy_to(first.offset, length, out)
            except EOFError:
                where = self.dst if first.source is None else first.source.path
                raise ModelWriteError(f"{where}: file shrank while reading "
                                      f"{first.name!r}") from None


def _runs(slots: list[Slot]) -> list[list[Slot]]:
    """Consecutive slots whose bytes are adjacent in the same file, so one copy moves them."""
    runs: list[list[Slot]] = []
    for slot in slots:
        last = runs[-1][-1] if runs else None
        if (last is not None and last.source == slot.source
                and last.offset + last.nbytes == slot.offset):
            runs[-1].append(slot)
        else:
            runs.append([slot])
    return runs


def write_file(dst: Path, slots: list[Slot], metadata: dict[str, str], spill: Spill,
               progress: Progress | None = None) -> int:
    """Assemble one safetensors file atomically at `dst`; return its size."""
    with atomic_path(dst) as tmp:
        with open(tmp, "wb", buffering=0) as out:
            spill.assemble(out, slots, metadata, progress)
        size = tmp.stat().st_size
    return size


__all__ = ["Slot", "Spill", "write_file"]
