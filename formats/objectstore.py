"""Objects in storage through fsspec: ranged reads, listings, and outputs committed whole.

Credentials and endpoints come from each file system's usual configuration:
for s3:// that is s3fs and botocore's (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY
or AWS_PROFILE, AWS_ENDPOINT_URL or AWS_ENDPOINT_URL_S3 for an S3-compatible
server), and fsspec's own FSSPEC_<PROTOCOL>_<OPTION> variables (such as
FSSPEC_S3_ENDPOINT_URL). Nothing here takes a credential.

Reading: `RemoteFile` answers each read with one ranged GET (`cat_file` with
start and end), so a model streams from storage tensor by tensor as it does
from a local file, never downloaded whole.

Writing: an output is made in a local staging folder by the same writers as
a local output, then uploaded so that no object at an output key is ever
partial. Where the protocol commits an upload as a whole (S3's multipart
upload, completed last; GCS's resumable upload) the object is written in
place and an upload that fails or is interrupted is aborted. Elsewhere it
goes to a hidden temporary key beside the output, moved into place when
complete and removed on failure. A model of several objects (shards and
their index, an ONNX model and its data file) uploads the index or model
last, after removing an old one, so it never names objects of another run.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, Callable, Iterator

import numpy as np
from fsspec.core import url_to_fs

from modelpress.core.errors import ModelpressError, ModelReadError, ModelWriteError

from modelpress.formats.url import ObjectPath

# Protocols whose uploads appear only once committed, and fsspec's files for them
# (opened with autocommit=False) can commit or discard one.
COMMITTING = {"s3", "s3a", "gs", "gcs"}
# Part size of an upload (S3 allows 10,000 parts: outputs up to 320 GB).
PART_BYTES = 32 << 20
# Bytes per ranged read when a range is copied or hashed.
CHUNK = 1 << 24
_EXTRAS = {"s3": "'modelpress[s3]' (s3fs)", "s3a": "'modelpress[s3]' (s3fs)",
           "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs"}
TMP_SUFFIX = ".modelpress-tmp"


def filesystem(path: ObjectPath) -> tuple[Any, str]:
    """The fsspec file system of a URL (cached per process) and the path within it."""
    try:
        return url_to_fs(path.url)
    except ImportError:
        extra = _EXTRAS.get(path.protocol, f"the fsspec implementation of {path.protocol}://")
        raise ModelReadError(f"{path}: {path.protocol}:// URLs need {extra}: pip install "
                             f"{extra.split(' ')[0]}") from None
    except ValueError as exc:  # an unknown protocol
        raise ModelReadError(f"{path}: {exc}; give a local path or a URL fsspec knows "
                             "(s3://, gs://, memory://, ...)") from None


def failed(path: ObjectPath, exc: BaseException, what: str = "cannot read") -> ModelpressError:
    """The user's error for a storage request that failed (missing, denied, unreachable)."""
    if isinstance(exc, ModelpressError):
        return exc
    kind = ModelWriteError if what.startswith("cannot write") else ModelReadError
    if isinstance(exc, FileNotFoundError):
        return kind(f"{path}: no such object")
    if isinstance(exc, PermissionError):
        return kind(f"{path}: access denied ({exc}); check the credentials in the environment")
    return kind(f"{path}: {what} ({type(exc).__name__}: {' '.join(str(exc).split())[:300]})")


@dataclass(frozen=True)
class RemoteFile:
    """An object read by ranged GETs (see modelpress.formats.source.ByteSource)."""

    path: ObjectPath
    size: int = field(compare=False)
    fs: Any = field(compare=False, repr=False)
    key: str = field(compare=False, repr=False)

    @classmethod
    def open(cls, path: ObjectPath) -> RemoteFile:
        fs, key = filesystem(path)
        try:
            info = fs.info(key)
        except Exception as exc:
            raise failed(path, exc) from None
        if info.get("type") != "file":
            raise ModelReadError(f"{path}: is a folder (a prefix), not an object")
        return cls(path, int(info["size"]), fs, key)

    def read(self, offset: int, length: int) -> bytes:
        end = min(offset + length, self.size)
        if end <= offset:
            return b""
        try:
            return self.fs.cat_file(self.key, start=offset, end=end)
        except Exception as exc:
            raise failed(self.path, exc) from None

    def array(self, offset: int, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        dtype = np.dtype(dtype)
        count = int(np.prod(shape, dtype=np.int64))
        raw = self.read(offset, count * dtype.itemsize)
        if len(raw) != count * dtype.itemsize:
            raise ValueError(f"the object ended {count * dtype.itemsize - len(raw)} bytes early")
        return np.frombuffer(raw, dtype=dtype, count=count).reshape(shape)

    def copy_to(self, offset: int, length: int, out: BinaryIO) -> None:
        position, end = offset, offset + length
        while position < end:
            chunk = self.read(position, min(CHUNK, end - position))
            if not chunk:
                raise EOFError(f"ended {end - position} bytes early")
            view, written = memoryview(chunk), 0
            while written < len(view):
                written += out.write(view[written:])
            position += len(chunk)


def _info(path: ObjectPath) -> dict[str, Any] | None:
    fs, key = filesystem(path)
    try:
        return fs.info(key)
    except FileNotFoundError:
        return None
    except Exception as exc:
        raise failed(path, exc) from None


def exists(path: ObjectPath) -> bool:
    return _info(path) is not None


def is_file(path: ObjectPath) -> bool:
    info = _info(path)
    return info is not None and info.get("type") == "file"


def is_dir(path: ObjectPath) -> bool:
    info = _info(path)
    return info is not None and info.get("type") == "directory"


def size(path: ObjectPath) -> int:
    return RemoteFile.open(path).size


def read_bytes(path: ObjectPath) -> bytes:
    source = RemoteFile.open(path)
    return source.read(0, source.size)


def walk(prefix: ObjectPath) -> list[ObjectPath]:
    """Every object under a prefix (at any depth), sorted by URL."""
    fs, key = filesystem(prefix)
    try:
        found = fs.find(key, detail=True)
    except Exception as exc:
        raise failed(prefix, exc) from None
    return sorted(prefix / PurePosixPath(name).relative_to(key)
                  for name, info in found.items()
                  if info.get("type") == "file" and name != key)


def remove(path: ObjectPath) -> None:
    """Delete an object if it is there."""
    fs, key = filesystem(path)
    try:
        fs.rm_file(key)
    except FileNotFoundError:
        pass
    except Exception as exc:
        raise failed(path, exc, "cannot delete") from None
    fs.invalidate_cache(key)


def after_part(path: ObjectPath, done: int) -> None:
    """Called after each part of an upload is handed to the store; does nothing.

    A test hook: the tests make it fail (or wait to be killed) mid-upload.
    """


def upload(local: Path, dst: ObjectPath) -> None:
    """Upload a local file to `dst` so that the object appears only when complete."""
    fs, key = filesystem(dst)
    try:
        if dst.protocol in COMMITTING:
            _upload_committed(fs, local, dst, key)
        else:
            _upload_moved(fs, local, dst)
    except BaseException as exc:
        if isinstance(exc, Exception):
            raise failed(dst, exc, "cannot write the output; nothing was written there") \
                from None
        raise
    fs.invalidate_cache(key)


def _upload_committed(fs: Any, local: Path, dst: ObjectPath, key: str) -> None:
    out = fs.open(key, "wb", autocommit=False, block_size=PART_BYTES)
    try:
        _pump(local, out, dst)
        out.close()
        out.commit()
    except BaseException:
        with contextlib.suppress(Exception):
            out.discard()  # S3: abort the multipart upload, its parts are deleted
        raise


def _upload_moved(fs: Any, local: Path, dst: ObjectPath) -> None:
    temporary = dst.parent / f".{dst.name[:100]}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}"
    _, tmp_key = filesystem(temporary)
    _, key = filesystem(dst)
    try:
        with fs.open(tmp_key, "wb") as out:
            _pump(local, out, dst)
        fs.mv(tmp_key, key)
    except BaseException:
        with contextlib.suppress(Exception):
            fs.rm_file(tmp_key)
        raise


def _pump(local: Path, out: BinaryIO, dst: ObjectPath) -> None:
    done = 0
    with open(local, "rb") as fh:
        while chunk := fh.read(CHUNK):
            out.write(chunk)
            done += len(chunk)
            after_part(dst, done)


@contextlib.contextmanager
def staged(dst: ObjectPath, old_parts: Callable[[Path], list[str]]) -> Iterator[Path]:
    """A local path to write the output `dst` at; when the block succeeds every file written
    beside it is uploaded (see the module's doc), `dst` itself last.

    `old_parts(local_copy_of_an_old_dst)` names the objects an output already at
    `dst` owns (shards of an index); those the new output no longer has are removed.
    """
    folder = Path(tempfile.mkdtemp(prefix="modelpress-stage-"))
    try:
        local = folder / dst.name
        yield local
        names = sorted(n for n in os.listdir(folder) if n != dst.name and not n.startswith("."))
        stale = _old_parts(dst, folder, old_parts) - set(names)
        remove(dst)   # an old marker must never name the objects uploaded next
        committed: list[ObjectPath] = []
        try:
            for name in names + [dst.name]:
                upload(folder / name, dst.parent / name)
                committed.append(dst.parent / name)
        except BaseException:
            for target in committed:
                with contextlib.suppress(Exception):
                    remove(target)
            raise
        for name in sorted(stale):
            remove(dst.parent / name)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _old_parts(dst: ObjectPath, folder: Path, old_parts: Callable[[Path], list[str]]) -> set[str]:
    """The part names of an output already at `dst` (read through a local copy of it)."""
    if not is_file(dst):
        return set()
    old = folder / ".old"
    old.write_bytes(read_bytes(dst))
    try:
        return set(old_parts(old))
    except ModelpressError:
        return set()
    finally:
        old.unlink()


def write_bytes(dst: ObjectPath, data: bytes) -> None:
    """A small object (a config.json) written whole."""
    with staged(dst, lambda _: []) as local:
        local.write_bytes(data)


def copy(source: Any, dst: ObjectPath) -> None:
    """Copy a file or object (a ByteSource) to `dst`, streamed through this process."""
    with staged(dst, lambda _: []) as local:
        with open(local, "wb", buffering=0) as out:
            source.copy_to(0, source.size, out)


__all__ = ["COMMITTING", "PART_BYTES", "RemoteFile", "after_part", "copy", "exists", "failed",
           "filesystem", "is_dir", "is_file", "read_bytes", "remove", "size", "staged", "upload",
           "walk", "write_bytes"]
