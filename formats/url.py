"""Object storage URLs as paths: an `ObjectPath` gives an fsspec URL what batch runs and
stores use of a `Path` (name, suffix, parent, `/`), without any I/O."""

from __future__ import annotations

import posixpath
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Union

# A URL scheme of two letters or more ("C:" on Windows is a drive, not a scheme).
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")


@dataclass(frozen=True, order=True)
class ObjectPath:
    """An object (or a prefix, for a folder) in storage, by its URL: s3://bucket/key."""

    url: str

    def __post_init__(self) -> None:
        protocol, rest = self.url.split("://", 1)
        rest = re.sub(r"/{2,}", "/", rest).rstrip("/")
        object.__setattr__(self, "url", f"{protocol.lower()}://{rest}")

    @property
    def protocol(self) -> str:
        return self.url.split("://", 1)[0]

    @property
    def key(self) -> str:
        """The URL without its protocol: bucket/key."""
        return self.url.split("://", 1)[1]

    @property
    def name(self) -> str:
        return posixpath.basename(self.key)

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.name).suffix

    @property
    def parent(self) -> ObjectPath:
        head = posixpath.dirname(self.key)
        return ObjectPath(f"{self.protocol}://{head}") if head else self

    def __truediv__(self, other: str | PurePosixPath) -> ObjectPath:
        joined = posixpath.normpath(posixpath.join(self.key, str(other)))
        return ObjectPath(f"{self.protocol}://{joined}")

    def relative_to(self, base: ObjectPath) -> PurePosixPath:
        """This object's key relative to the prefix `base` (ValueError if not under it)."""
        if base.protocol != self.protocol or not self.key.startswith(base.key + "/"):
            raise ValueError(f"{self} is not under {base}")
        return PurePosixPath(self.key[len(base.key) + 1:])

    def is_relative_to(self, base: ObjectPath) -> bool:
        return base.protocol == self.protocol and (
            self.key == base.key or self.key.startswith(base.key + "/"))

    def __str__(self) -> str:
        return self.url


AnyPath = Union[Path, ObjectPath]
"""A local file or folder, or an object or prefix in storage."""


def location(given: str | Path | ObjectPath) -> AnyPath:
    """A command-line path or URL as a Path (file:// URLs too) or an ObjectPath."""
    if isinstance(given, (Path, ObjectPath)):
        return given
    text = str(given)
    match = _URL.match(text)
    if match is None:
        return Path(text)
    if match.group(1).lower() in ("file", "local"):
        return Path(text[match.end():] or "/")
    return ObjectPath(text)



__all__ = ["AnyPath", "ObjectPath", "location"]
