"""Where a file is: a local path, or an object in storage named by an fsspec URL.

Models and outputs may live in object storage (`s3://bucket/models/x.onnx`,
`gs://...`, `memory://...`): see `modelpress.formats.url.ObjectPath`. The
functions here answer for either kind; for objects they go through
`modelpress.formats.objectstore` (fsspec, an optional extra), loaded only
when a URL is given. `file://` URLs are local paths.
"""

from __future__ import annotations

from types import ModuleType

from modelpress.core.errors import ModelReadError

from modelpress.formats.url import AnyPath, ObjectPath, location


def is_remote(path: object) -> bool:
    """True for an object in storage (an ObjectPath)."""
    return isinstance(path, ObjectPath)


def storage() -> ModuleType:
    """modelpress.formats.objectstore: the I/O of objects in storage (fsspec).

    Raises ModelReadError naming what to install when fsspec is missing.
    """
    try:
        # fsspec: an optional extra (0.1 s to import; s3fs 0.3 s more), only for URLs
        import modelpress.formats.objectstore as objectstore
    except ImportError as exc:
        if (exc.name or "").split(".")[0] != "fsspec":
            raise
        raise ModelReadError("object storage URLs need fsspec: pip install 'modelpress[s3]' "
                             "(fsspec and s3fs; gcsfs for gs://)") from None
    return objectstore


def exists(path: AnyPath) -> bool:
    """Whether a file or folder (an object or prefix) is there."""
    return storage().exists(path) if isinstance(path, ObjectPath) else path.exists()


def is_file(path: AnyPath) -> bool:
    """Whether a regular file (an object) is there."""
    return storage().is_file(path) if isinstance(path, ObjectPath) else path.is_file()


def is_dir(path: AnyPath) -> bool:
    """Whether a folder (a prefix holding objects) is there."""
    if isinstance(path, ObjectPath):
        return storage().is_dir(path)
    try:
        return path.is_dir()
    except OSError:  # a name too long: not a folder we could use
        return False


def file_size(path: AnyPath) -> int:
    """Bytes of a file or object."""
    return storage().size(path) if isinstance(path, ObjectPath) else path.stat().st_size


def read_bytes(path: AnyPath) -> bytes:
    """A whole (small) file: an index, a config.json."""
    return storage().read_bytes(path) if isinstance(path, ObjectPath) else path.read_bytes()


__all__ = ["AnyPath", "ObjectPath", "exists", "file_size", "is_dir", "is_file",
           "is_remote", "location", "read_bytes", "storage"]
