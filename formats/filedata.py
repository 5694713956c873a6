"""Raw tensor bytes in files: mapped one tensor at a time, written and copied without copies.

Peak memory has to follow the largest tensor, not the model. A tensor is read
by mapping just its byte range: the pages come straight from the page cache
(no copy) and leave the process's resident set when the array is freed. A map
of the whole file (what `safe_open` does) would keep every page touched
resident until the file is closed, so a full pass over a 4 GB checkpoint would
show 4 GB of resident memory.
"""

from __future__ import annotations

import math
import mmap
import os
from typing import BinaryIO

import numpy as np

# Bytes per copy_file_range call and per buffered chunk of a fallback copy.
_CHUNK = 1 << 24


def map_range(path: str | os.PathLike, offset: int, dtype: np.dtype,
              shape: tuple[int, ...]) -> np.ndarray:
    """A read-only array over `shape` elements of `dtype` stored at `offset` in `path`.

    The map lives as long as the array (or a view of it) does.
    """
    dtype = np.dtype(dtype)
    count = math.prod(shape)
    nbytes = count * dtype.itemsize
    if nbytes == 0:
        return np.empty(shape, dtype=dtype)
    start = offset - offset % mmap.ALLOCATIONGRANULARITY
    with open(path, "rb") as fh:
        mapped = mmap.mmap(fh.fileno(), nbytes + offset - start, offset=start,
                           access=mmap.ACCESS_READ)
    if hasattr(mmap, "MADV_SEQUENTIAL"):  # read ahead, and drop pages behind us early
        mapped.madvise(mmap.MADV_SEQUENTIAL)
    return np.frombuffer(mapped, dtype=dtype, count=count, offset=offset - start).reshape(shape)


def write_array(out: BinaryIO, array: np.ndarray) -> int:
    """Write an array's bytes (C order) without making a bytes copy; return the count."""
    flat = np.ascontiguousarray(array).reshape(-1)
    if flat.size == 0:
        return 0
    view = memoryview(flat.view(np.uint8))
    written = 0
    while written < len(view):  # a raw file may take fewer bytes than asked
        written += out.write(view[written:])
    return written


def copy_range(src: str | os.PathLike | BinaryIO, offset: int, length: int,
               out: BinaryIO) -> None:
    """Append `length` bytes of `src` (a path or an open file) from `offset` to the file `out`.

    The kernel copies the bytes (copy_file_range) where it can, so they never
    pass through this process. `out` must be unbuffered (its position is the
    descriptor's). A source shorter than expected raises EOFError.
    """
    if hasattr(src, "fileno"):
        _copy_fd(src.fileno(), offset, length, out)
        return
    with open(src, "rb", buffering=0) as fh:
        _copy_fd(fh.fileno(), offset, length, out)


def _copy_fd(fd: int, offset: int, length: int, out: BinaryIO) -> None:
    position, remaining = offset, length
    use_kernel = hasattr(os, "copy_file_range")
    while remaining:
        step = min(remaining, _CHUNK)
        done = 0
        if use_kernel:
            try:
                done = os.copy_file_range(fd, out.fileno(), step, position)
            except OSError:  # not supported here (old kernel, some file systems)
                use_kernel = False
        if not use_kernel:
            chunk = os.pread(fd, step, position)
            done = len(chunk)
            written = 0
            while written < done:
                written += out.write(chunk[written:])
        if done == 0:
            raise EOFError(f"ended {remaining} bytes early")
        position += done
        remaining -= done
