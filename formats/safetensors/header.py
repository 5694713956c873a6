"""Reading and checking a safetensors header before any tensor is touched."""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from typing import Iterator, Mapping

import numpy as np

from modelpress.core.dtypes import ml_dtype
from modelpress.core.errors import ModelReadError

from modelpress.formats.location import AnyPath, ObjectPath
from modelpress.formats.source import ByteSource, open_source

# numpy's own dtypes by safetensors code; bf16 and fp8 are ml_dtypes', by their names.
_NUMPY_DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}
_ML_DTYPES = {"BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
_ML_CODES = {name: code for code, name in _ML_DTYPES.items()}
_NUMPY_CODES = {dtype: code for code, dtype in _NUMPY_DTYPES.items()}


class _Dtypes(Mapping[str, np.dtype]):
    """safetensors dtype code -> numpy dtype. ml_dtypes (0.6 s to import) is loaded only
    when a bf16 or fp8 dtype is looked up, so float32 files never pay for it."""

    _order = ("F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "I64", "I32", "I16", "I8",
              "U64", "U32", "U16", "U8", "BOOL")

    def __getitem__(self, code: str) -> np.dtype:
        if code in _ML_DTYPES:
            return ml_dtype(_ML_DTYPES[code])
        return _NUMPY_DTYPES[code]

    def __iter__(self) -> Iterator[str]:
        return iter(self._order)

    def __len__(self) -> int:
        return len(self._order)


DTYPES: Mapping[str, np.dtype] = _Dtypes()
# A header beyond this is not a model header; safetensors itself caps it at 100 MB.
MAX_HEADER = 100 * 1024 * 1024


def loads_strict(text: str | bytes) -> object:
    """json.loads that refuses what a well-formed header never holds: a key given twice
    in one object (json would keep the last silently) and nesting too deep to parse
    (json would raise RecursionError). Both raise ValueError."""
    try:
        return json.loads(text, object_pairs_hook=_unique_keys)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    found = dict(pairs)
    if len(found) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"key {twice!r} appears more than once")
    return found


@dataclass(frozen=True)
class Entry:
    """One tensor's header entry; offsets are absolute positions in the file."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def np_dtype(self) -> np.dtype:
        return DTYPES[self.dtype]


@dataclass(frozen=True)
class Header:
    """A parsed, checked header: entries in file order and the metadata."""

    entries: dict[str, Entry]
    metadata: dict[str, str]
    data_start: int


def dtype_code(dtype: np.dtype) -> str:
    """The safetensors dtype string of a numpy dtype."""
    dtype = np.dtype(dtype)
    try:
        return _ML_CODES[dtype.name] if dtype.kind in "fV" and dtype.name in _ML_CODES \
            else _NUMPY_CODES[dtype]
    except KeyError:
        raise ValueError(f"safetensors has no dtype for {np.dtype(dtype)}") from None


def read_header(file: AnyPath | ByteSource) -> Header:
    """Parse and validate the header of a safetensors file (a path, a URL or a source);
    raise ModelReadError. Only the header's bytes are read."""
    source = open_source(file) if isinstance(file, (str, os.PathLike, ObjectPath)) else file
    path, size = source.path, source.size
    if size < 8:
        raise ModelReadError(f"{path}: not a safetensors file ({size} bytes; expected an 8-byte "
                             "header length and a JSON header)")
    (length,) = struct.unpack("<Q", source.read(0, 8))
    if length > MAX_HEADER or length > size - 8:
        raise ModelReadError(f"{path}: corrupt or truncated safetensors file (header length "
                             f"{length} bytes, file {size} bytes)")
    raw = source.read(8, length)
    try:
        header = loads_strict(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise ModelReadError(f"{path}: corrupt safetensors header (not valid JSON); "
                             "the file is damaged or not safetensors") from None
    except ValueError as exc:
        what = "not valid JSON" if isinstance(exc, json.JSONDecodeError) else str(exc)
        raise ModelReadError(f"{path}: corrupt safetensors header ({what}); "
                             "the file is damaged or not safetensors") from None
    if not isinstance(header, dict):
        raise ModelReadError(f"{path}: corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise ModelReadError(f"{path}: corrupt safetensors header (__metadata__ must map "
                             "strings to strings)")
    data_start = 8 + length
    entries = [_entry(path, name, spec, data_start, size) for name, spec in header.items()]
    entries.sort(key=lambda e: (e.begin, e.end))
    # Like safetensors itself, require the tensors to tile the data exactly: a gap or
    # trailing bytes would be data no tensor accounts for (and safe_open rejects them).
    previous, position = None, data_start
    for entry in entries:
        if entry.begin < position:
            raise ModelReadError(f"{path}: corrupt safetensors header (tensors {previous.name!r} "
                                 f"and {entry.name!r} overlap)")
        if entry.begin > position:
            raise ModelReadError(f"{path}: corrupt safetensors header ({entry.begin - position} "
                                 f"bytes before tensor {entry.name!r} belong to no tensor)")
        previous, position = entry, entry.end
    if position != size:
        raise ModelReadError(f"{path}: corrupt safetensors file ({size - position} bytes after "
                             "the last tensor belong to no tensor)")
    return Header({e.name: e for e in entries}, dict(metadata), data_start)


def _entry(path: AnyPath, name: str, spec: object, data_start: int, size: int) -> Entry:
    def bad(reason: str) -> ModelReadError:
        return ModelReadError(f"{path}: corrupt safetensors header: tensor {name!r} {reason}")

    if not isinstance(spec, dict):
        raise bad("has no dtype/shape/data_offsets entry")
    dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise bad(f"has unsupported dtype {dtype!r} (supported: {', '.join(DTYPES)})")
    if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise bad(f"has an invalid shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
            or not 0 <= offsets[0] <= offsets[1]):
        raise bad(f"has invalid data_offsets {offsets!r}")
    begin, end = data_start + offsets[0], data_start + offsets[1]
    if end > size:
        raise ModelReadError(f"{path}: truncated safetensors file: tensor {name!r} ends at byte "
                             f"{end} but the file has {size} bytes")
    expected = math.prod(shape) * DTYPES[dtype].itemsize
    if end - begin != expected:
        raise bad(f"holds {end - begin} bytes but its shape {shape} and dtype {dtype} "
                  f"need {expected}")
    return Entry(name, dtype, tuple(shape), begin, end)


def encode_header(entries: list[tuple[str, str, tuple[int, ...], int]],
                  metadata: dict[str, str]) -> bytes:
    """Serialise a header for tensors written back to back in the given order.

    `entries` are (name, dtype code, shape, nbytes). The JSON is padded with
    spaces so the data starts on an 8-byte boundary, as safetensors does.
    """
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = metadata
    offset = 0
    for name, code, shape, nbytes in entries:
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw
