"""Atomic file output: a temporary file in the destination folder, fsync, rename."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator

from modelpress.core.errors import ModelWriteError


@contextlib.contextmanager
def atomic_path(dst: Path) -> Iterator[Path]:
    """Yield a temporary path beside `dst`; on success it replaces `dst` whole.

    On any exception the temporary file is removed and `dst` is untouched, so
    an interrupted run leaves either the old file or nothing at the output name.
    """
    dst = Path(dst)
    try:
        # The name is cut so that any legal output name gives a legal temporary name.
        fd, tmp = tempfile.mkstemp(prefix=f".{dst.name[:100]}.", suffix=".modelpress-tmp",
                                   dir=dst.parent)
    except OSError as exc:
        raise ModelWriteError(f"{dst}: cannot create the output ({exc.strerror or exc})") from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp_path, 0o644)
        os.replace(tmp_path, dst)
        fsync_dir(dst.parent)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        if isinstance(exc, OSError):  # disk full, quota, I/O error: the user's to fix
            raise ModelWriteError(f"{dst}: cannot write the output ({exc.strerror or exc}); "
                                  "nothing was written") from None
        raise


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (a rename into it) to disk, where the system allows."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_paths(dsts: list[Path]) -> Iterator[list[Path]]:
    """Yield one temporary path per destination; on success all are renamed into place.

    For outputs made of several files (a sharded checkpoint and its index).
    The last destination is the completion marker: an old file at that name is
    removed before any rename and the new one is renamed last, so an
    interrupted run never pairs a new set of files with an old marker, and no
    output name ever holds a partly written file. On any exception every
    temporary file is removed.
    """
    dsts = [Path(d) for d in dsts]
    tmps: list[Path] = []
    try:
        for dst in dsts:
            fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".modelpress-tmp",
                                       dir=dst.parent)
            os.close(fd)
            tmps.append(Path(tmp))
        yield list(tmps)
        for tmp in tmps:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.chmod(tmp, 0o644)
        if dsts[-1].exists() or dsts[-1].is_symlink():
            dsts[-1].unlink()
        for tmp, dst in zip(tmps, dsts):
            os.replace(tmp, dst)
        for folder in {dst.parent for dst in dsts}:
            fsync_dir(folder)
    except BaseException:
        for tmp in tmps:
            with contextlib.suppress(OSError):
                tmp.unlink()
        raise
