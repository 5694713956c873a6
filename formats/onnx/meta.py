"""The text modelpress stores under the ONNX `metadata_props` key "modelpress".

The value is the JSON document `{"format_version": 1, "tensors": {...}}`
compressed with zlib and written in base64 after the prefix "zlib:": the
per-tensor specs repeat initializer names and field names, and a model's
small tensors would otherwise pay several kB of metadata (on the sample
transformer 5.3 kB of JSON become 0.8 kB). Values that start with "{" are
plain JSON, as written by modelpress before 0.2, and are still read.
"""

from __future__ import annotations

import base64
import binascii
import json
import zlib
from typing import Any

PREFIX = "zlib:"
MAX_TEXT = 256 << 20  # decompressed bytes a reader accepts (no zip bombs)


def encode_doc(doc: dict[str, Any]) -> str:
    """The metadata value for a JSON-serialisable document."""
    text = json.dumps(doc, separators=(",", ":")).encode()
    return PREFIX + base64.b64encode(zlib.compress(text, 9)).decode("ascii")


def decode_doc(value: str) -> Any:
    """The document a metadata value holds; ValueError if it is not one."""
    if not value.startswith(PREFIX):
        return _loads(value)
    try:
        packed = base64.b64decode(value[len(PREFIX):], validate=True)
        inflate = zlib.decompressobj()
        text = inflate.decompress(packed, MAX_TEXT)
    except (binascii.Error, zlib.error) as exc:
        raise ValueError(f"undecodable compressed metadata ({exc})") from None
    if inflate.unconsumed_tail or not inflate.eof:
        raise ValueError("compressed metadata is truncated or larger than "
                         f"{MAX_TEXT >> 20} MiB")
    return _loads(text)


def _loads(text: str | bytes) -> Any:
    try:
        return json.loads(text)
    except RecursionError:  # hostile metadata nested 100k deep
        raise ValueError("JSON nested too deeply") from None
