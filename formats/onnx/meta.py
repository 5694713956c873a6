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
from pathlib import Path
from typing import Any, Mapping

import onnx

from modelpress.core.errors import ModelReadError

PREFIX = "zlib:"
MAX_TEXT = 256 << 20  # decompressed bytes a reader accepts (no zip bombs)


METADATA_KEY = "modelpress"
FORMAT_VERSION = 1

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


def set_metadata(model: onnx.ModelProto, specs: dict[str, dict[str, Any]],
                 extra: Mapping[str, str] | None = None) -> None:
    """Write the specs of the encoded tensors (and `extra` entries) to metadata_props."""
    # Every modelpress-owned key ("modelpress", "modelpress.source") is rewritten,
    # never inherited from the input.
    kept = [(e.key, e.value) for e in model.metadata_props if not e.key.startswith(METADATA_KEY)]
    del model.metadata_props[:]
    for key, value in kept:
        model.metadata_props.add(key=key, value=value)
    if specs:
        entry = model.metadata_props.add()
        entry.key = METADATA_KEY
        entry.value = encode_doc({"format_version": FORMAT_VERSION, "tensors": specs})
    for key, value in (extra or {}).items():
        model.metadata_props.add(key=key, value=value)


def read_encodings(path: Path, model: onnx.ModelProto,
                   tensors: set[str]) -> dict[str, dict[str, Any]]:
    """The specs of the model's modelpress-encoded tensors, checked against `tensors`."""
    raw = next((p.value for p in model.metadata_props if p.key == METADATA_KEY), None)
    if raw is None:
        return {}
    try:
        doc = decode_doc(raw)
        if doc.get("format_version", 0) > FORMAT_VERSION:
            raise ModelReadError(f"{path}: written by a newer modelpress; upgrade modelpress")
        specs = dict(doc["tensors"])
        for name, spec in specs.items():
            _check_spec(name, spec, tensors)
        return specs
    except ModelReadError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelReadError(f"{path}: corrupt modelpress metadata ({exc})") from None


def _check_spec(name: str, spec: Any, tensors: set[str]) -> None:
    """Raise ValueError unless a tensor's spec has the fields readers rely on."""
    if not isinstance(spec, dict) or not isinstance(spec.get("layout"), str):
        raise ValueError(f"tensor {name!r} has no layout")
    onnx.helper.tensor_dtype_to_np_dtype(spec["dtype"])
    shape = spec["shape"]
    if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ValueError(f"tensor {name!r} has an invalid shape {shape!r}")
    parts = _spec_parts(spec) or [name]  # no parts: stored densely under its own name
    missing = [p for p in parts if not isinstance(p, str) or p not in tensors]
    nodes = spec_nodes(spec) if isinstance(spec.get("nodes", []), list) else [None]
    if missing or not all(isinstance(n, str) for n in nodes):
        raise ValueError(f"tensor {name!r} lacks {missing or 'its node list'}")


def _spec_parts(spec: Any) -> list[Any]:
    """Initializer names a spec refers to, in nested specs too."""
    if not isinstance(spec, dict):
        return []
    inits = spec.get("initializers", {})
    found = list(inits.values()) if isinstance(inits, dict) else [inits]
    for key, value in spec.items():
        if key != "initializers" and isinstance(value, dict):
            found += _spec_parts(value)
    return found


def spec_initializers(spec: dict[str, Any]) -> list[str]:
    """Every initializer name a spec (and its nested specs) owns."""
    names = list(spec.get("initializers", {}).values())
    for part in ("left", "right"):
        if part in spec:
            names += spec_initializers(spec[part])
    return names


def spec_nodes(spec: dict[str, Any]) -> list[str]:
    """Every node name a spec (and its nested specs) owns."""
    names = list(spec.get("nodes", []))
    for part in ("left", "right"):
        if part in spec:
            names += spec_nodes(spec[part])
    return names


def _loads(text: str | bytes) -> Any:
    try:
        return json.loads(text)
    except RecursionError:  # hostile metadata nested 100k deep
        raise ValueError("JSON nested too deeply") from None
