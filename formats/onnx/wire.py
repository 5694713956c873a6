"""Where the raw_data of a model's initializers lies in its .onnx file (protobuf wire format).

Every read of a TensorProto's `raw_data` through protobuf's Python API makes
a fresh copy of the bytes: for a model of hundreds of MB, each pass that only
wants a tensor's length or a look at its values copies the weights again.
Knowing where each initializer's raw_data sits in the file, its length costs
nothing and its values can be mapped straight from the page cache
(`filedata.map_range`).

`raw_spans` walks the file's wire format just deep enough to find them: the
model's `graph` field, the graph's `initializer` fields (in order, as the
parsed model lists them) and each initializer's `raw_data` field. Anything
else it does not expect (a graph given twice, which protobuf would merge;
deprecated group fields; a truncated field) makes it give up, and callers
read `raw_data` as before.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import serialization

from modelpress.formats.source import ByteSource

_MODEL_GRAPH = 7        # ModelProto.graph
_GRAPH_INITIALIZER = 5  # GraphProto.initializer
_TENSOR_RAW_DATA = 9    # TensorProto.raw_data
# Wire types.
_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5
# A tensor with more fields than this (unpacked repeated values) is not worth a
# walk in Python: give up and let protobuf's copy do.
_MAX_TENSOR_FIELDS = 256


class _Unexpected(Exception):
    """The bytes are not laid out as this walk expects."""


class RawSpans:
    """The file offset and length of the raw_data of a parsed model's main-graph initializers.

    Looked up by the TensorProto object itself (protobuf hands back the same
    Python object for a message while one is alive, and the spans hold each
    one): a tensor not found here, from another graph or another copy of the
    model, simply has no known span.
    """

    def __init__(self) -> None:
        self._spans: dict[int, tuple[onnx.TensorProto, int, int]] = {}

    def add(self, tensor: onnx.TensorProto, offset: int, length: int) -> None:
        """Record that `tensor`'s raw_data is `length` bytes at `offset` in the file."""
        self._spans[id(tensor)] = (tensor, offset, length)

    def span(self, tensor: onnx.TensorProto) -> tuple[int, int] | None:
        """(offset, length) of the tensor's raw_data in the file, or None if unknown."""
        found = self._spans.get(id(tensor))
        if found is None or found[0] is not tensor:
            return None
        return found[1], found[2]

    def length(self, tensor: onnx.TensorProto) -> int | None:
        """Bytes of the tensor's raw_data, or None if unknown."""
        span = self.span(tensor)
        return None if span is None else span[1]

    def __len__(self) -> int:
        return len(self._spans)


def parse_mapped(path: Path) -> tuple[onnx.ModelProto, RawSpans]:
    """Parse a binary .onnx file through a map of it (no bytes copy of the file), and find
    where its initializers' raw_data lie. Raises what ParseFromString raises on bad input."""
    with open(path, "rb") as fh:
        if fh.seek(0, 2) == 0:
            return parse_buffer(b"")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            with memoryview(mapped) as view:
                return parse_buffer(view)


def parse_buffer(view: memoryview | bytes) -> tuple[onnx.ModelProto, RawSpans]:
    """Parse a binary model held in memory (or mapped), and find where its initializers'
    raw_data lie in it. Raises what ParseFromString raises on bad input."""
    model = onnx.ModelProto()
    spans = RawSpans()
    if not len(view):
        model.ParseFromString(b"")
        return model, spans
    consumed = model.ParseFromString(view)
    if consumed is not None and consumed != len(view):
        raise DecodeError(f"Protobuf decoding consumed too few bytes: {consumed} "
                          f"out of {len(view)}")
    found = raw_spans(view)
    if found is not None and len(found) == len(model.graph.initializer):
        for tensor, span in zip(model.graph.initializer, found):
            if span is not None and tensor.HasField("raw_data"):
                spans.add(tensor, *span)
    return model, spans


def is_binary(path: Path) -> bool:
    """Whether onnx.load would read `path` as binary protobuf (it picks text formats such
    as .textproto or .json by extension)."""
    return serialization.registry.get_format_from_file_extension(Path(path).suffix) in (
        None, "protobuf")


# Types whose raw_data numpy reads as it is (onnx's to_array unpacks 4-bit and 2-bit types).
_MAPPED_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                 onnx.TensorProto.BFLOAT16}


def mappable(tensor: onnx.TensorProto) -> bool:
    """Whether `map_tensor` reads this tensor's type as onnx's to_array does."""
    return tensor.data_type in _MAPPED_TYPES


def map_tensor(source: ByteSource, tensor: onnx.TensorProto, offset: int) -> np.ndarray:
    """A tensor whose raw_data is at `offset` in the file, read-only (see mappable): mapped
    from a local file, a view of a model read into memory."""
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
    return source.array(offset, dtype, tuple(tensor.dims))


def raw_spans(buf: memoryview | bytes) -> list[tuple[int, int] | None] | None:
    """For each initializer of the model's main graph, in order, (offset, length) of its
    raw_data in `buf` (None for one without); None if the layout is not one this walk
    follows."""
    try:
        graphs = [(start, end) for number, wire, start, end in _fields(buf, 0, len(buf))
                  if number == _MODEL_GRAPH and wire == _LENGTH]
        if len(graphs) != 1:
            return None if graphs else []
        spans: list[tuple[int, int] | None] = []
        for number, wire, start, end in _fields(buf, *graphs[0]):
            if number == _GRAPH_INITIALIZER and wire == _LENGTH:
                spans.append(_raw_data(buf, start, end))
        return spans
    except _Unexpected:
        return None


def _raw_data(buf: memoryview | bytes, start: int, end: int) -> tuple[int, int] | None:
    """The last raw_data field of the tensor in buf[start:end] (protobuf keeps the last)."""
    found = None
    for count, (number, wire, begin, stop) in enumerate(_fields(buf, start, end)):
        if count > _MAX_TENSOR_FIELDS:
            raise _Unexpected("too many fields")
        if number == _TENSOR_RAW_DATA and wire == _LENGTH:
            found = (begin, stop - begin)
    return found


def _fields(buf: memoryview | bytes, pos: int, end: int):
    """(field number, wire type, value start, value end) of each field in buf[pos:end]."""
    while pos < end:
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            _, stop = _varint(buf, pos, end)
        elif wire == _FIXED64:
            stop = pos + 8
        elif wire == _FIXED32:
            stop = pos + 4
        elif wire == _LENGTH:
            size, pos = _varint(buf, pos, end)
            stop = pos + size
        else:  # groups (deprecated) or invalid
            raise _Unexpected(f"wire type {wire}")
        if stop > end or number == 0:
            raise _Unexpected("truncated field")
        yield number, wire, pos, stop
        pos = stop


def _varint(buf: memoryview | bytes, pos: int, end: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= end or shift > 63:
            raise _Unexpected("bad varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
