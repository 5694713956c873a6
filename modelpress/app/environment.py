"""Versions of the tool and the libraries that produced a report."""

from __future__ import annotations

import platform
from importlib import metadata

from modelpress import __version__

# Distribution names whose versions go into every report (absent ones are null).
LIBRARIES = ("numpy", "onnx", "onnxruntime", "safetensors", "ml_dtypes", "PyYAML")


def package_version(name: str) -> str | None:
    """The installed version of a distribution, without importing it; None if absent."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def versions() -> dict[str, str | None]:
    """modelpress, Python and library versions, JSON-safe."""
    found: dict[str, str | None] = {"modelpress": __version__,
                                    "python": platform.python_version()}
    for name in LIBRARIES:
        found[name.lower()] = package_version(name)
    return found
