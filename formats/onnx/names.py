"""File names of ONNX outputs, free of the onnx import (safetensors runs check output
paths too, and importing onnx costs 0.7 s)."""

from __future__ import annotations

from pathlib import Path

from modelpress.formats.url import ObjectPath

DATA_SUFFIX = ".data"


def data_name(dst: Path | ObjectPath) -> str:
    """The external data file name written beside `dst`."""
    return (dst if isinstance(dst, ObjectPath) else Path(dst)).name + DATA_SUFFIX
