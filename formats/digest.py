"""Content digests of model files, for reports."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from modelpress.formats.source import CHUNK, open_source
from modelpress.formats.url import ObjectPath

_CHUNK = 1 << 20


def file_sha256(path: str | os.PathLike | ObjectPath) -> str:
    """Hex SHA-256 of a file's bytes (or an object's, streamed by ranges), read in chunks."""
    digest = hashlib.sha256()
    if isinstance(path, ObjectPath):
        source = open_source(path)
        for start in range(0, source.size, CHUNK):
            digest.update(source.read(start, CHUNK))
        return digest.hexdigest()
    with Path(path).open("rb") as fh:
        for chunk in iter(lambda: fh.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()
