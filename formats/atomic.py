"""Atomic file output: a temporary file in the destination folder, fsync, rename."""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
import time
from pathlib import Path
from typing import Iterator

from modelpress.core.errors import ModelWriteError

try:
    import fcntl
except ImportError:  # not POSIX (Windows): no advisory locks; temporary files stay unlocked
    fcntl = None

TMP_SUFFIX = ".modelpress-tmp"
# A temporary entry is taken for a dead run's only once it is this old and unlocked
# (a live run locks its own from just after creating it).
STALE_AFTER_S = 10.0


@contextlib.contextmanager
def atomic_path(dst: Path) -> Iterator[Path]:
    """Yield a temporary path beside `dst`; on success it replaces `dst` whole.

    On any exception the temporary file is removed and `dst` is untouched, so
    an interrupted run leaves either the old file or nothing at the output name.
    """
    dst = Path(dst)
    remove_stale(dst)
    try:
        # The name is cut so that any legal output name gives a legal temporary name.
        fd, tmp = tempfile.mkstemp(prefix=temp_prefix(dst), suffix=TMP_SUFFIX, dir=dst.parent)
    except OSError as exc:
        raise ModelWriteError(f"{dst}: cannot create the output ({exc.strerror or exc})") from None
    hold(fd)  # until the end: marks the file as a live run's for `remove_stale`
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp_path, output_mode(dst))
        with commit_lock(dst.parent):
            os.replace(tmp_path, dst)
        fsync_dir(dst.parent)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        raise_write_error(dst, exc)
        raise
    finally:
        os.close(fd)


def raise_write_error(dst: Path, exc: BaseException) -> None:
    """Raise the user's error for a write that failed with an OSError (disk full, quota,
    I/O error: theirs to fix); any other exception is left to the caller to re-raise."""
    if isinstance(exc, OSError):
        raise ModelWriteError(f"{dst}: cannot write the output ({exc.strerror or exc}); "
                              "nothing was written") from None


def temp_prefix(dst: Path) -> str:
    """The start of the name of every temporary file or folder made for `dst`."""
    return f".{Path(dst).name[:100]}."


def hold(fd: int) -> None:
    """Lock an open temporary file or folder for as long as `fd` stays open (the lock
    goes with the process, however it ends, so a SIGKILLed run's entries are unlocked)."""
    if fcntl is not None:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def remove_stale(dst: Path) -> None:
    """Remove temporary files and folders of `dst` that a killed run left behind.

    An entry is a dead run's when no process holds its lock (see `hold`) and
    it is at least STALE_AFTER_S old (a new one may not be locked yet).
    Where files cannot be locked nothing is removed.
    """
    if fcntl is None:
        return
    dst = Path(dst)
    prefix, now = temp_prefix(dst), time.time()
    try:
        entries = [e for e in os.scandir(dst.parent)
                   if e.name.startswith(prefix) and e.name.endswith(TMP_SUFFIX)]
    except OSError:
        return
    for entry in entries:
        try:
            if entry.is_symlink() or now - entry.stat().st_mtime < STALE_AFTER_S:
                continue
            fd = os.open(entry.path, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if entry.is_dir():
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                os.unlink(entry.path)
        except OSError:  # locked: a live run's
            pass
        finally:
            os.close(fd)


@contextlib.contextmanager
def commit_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on `folder` while an output's files are renamed into it.

    An output of several files (a model and its external data, shards and
    their index) is one unit only if no other writer renames files of the
    same name in between: two runs writing one output would otherwise leave
    the model of one beside the data of the other. The lock is the folder's
    own (flock on the directory), so nothing extra is left on disk; where
    directories cannot be locked the renames go on unlocked.
    """
    try:
        if fcntl is None:
            raise OSError("no advisory locks here")
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def output_mode(dst: Path) -> int:
    """The permission bits for a file about to replace `dst`: an existing file keeps its
    own, a new one gets what open() would give it (0666 less the umask).

    Temporary files are made 0600 (mkstemp); without this every output would
    be either private or, forced to 0644, readable by all under `umask 077`.
    """
    try:
        return stat.S_IMODE(os.stat(dst).st_mode)
    except OSError:
        return 0o666 & ~current_umask()


def current_umask() -> int:
    """The process's umask, read without changing it where the system allows."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: the only portable way to read it is to set it
    os.umask(mask)
    return mask


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
    fds: list[int] = []
    try:
        for dst in dsts:
            remove_stale(dst)
            fd, tmp = tempfile.mkstemp(prefix=temp_prefix(dst), suffix=TMP_SUFFIX,
                                       dir=dst.parent)
            fds.append(fd)
            hold(fd)
            tmps.append(Path(tmp))
        yield list(tmps)
        for tmp, dst in zip(tmps, dsts):
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.chmod(tmp, output_mode(dst))
        with contextlib.ExitStack() as locks:
            for folder in sorted({str(dst.parent.resolve()) for dst in dsts}):
                locks.enter_context(commit_lock(Path(folder)))
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
    finally:
        for fd in fds:
            os.close(fd)
