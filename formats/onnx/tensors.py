"""Reading an ONNX model and its tensors' data: inline, mapped, or in external data files."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from modelpress.core.errors import ModelReadError

from modelpress.formats.location import AnyPath
from modelpress.formats.onnx.graph import data_nbytes, external_data_file, graphs, is_external, used_names
from modelpress.formats.onnx.wire import RawSpans, is_binary, parse_buffer, parse_mapped
from modelpress.formats.source import ByteSource, LocalFile, MemoryFile, open_source


def model_source(path: AnyPath) -> ByteSource:
    """Where an ONNX model's tensors are read: a local file (mapped), or for a model in
    storage, the model file read whole into memory (protobuf parses it whole anyway;
    its external data stays in storage, read by ranges)."""
    source = open_source(path)
    if isinstance(source, LocalFile):
        return source
    return MemoryFile(source.path, source.read(0, source.size))


def load_model(source: ByteSource) -> tuple[onnx.ModelProto, RawSpans]:
    """The model (its external data not loaded) and where its initializers' raw_data lie."""
    path = source.path
    try:
        if isinstance(source, MemoryFile):
            model, spans = parse_buffer(source.data)
        elif is_binary(path):
            model, spans = parse_mapped(path)
        else:
            model, spans = onnx.load(str(path), load_external_data=False), RawSpans()
    except Exception as exc:  # protobuf's DecodeError and friends
        raise ModelReadError(f"{path}: not a valid ONNX model ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else 'unreadable'})") from None
    if not model.graph.node and not model.graph.initializer:
        raise ModelReadError(f"{path}: not a valid ONNX model (no graph); is it an ONNX file?")
    # protobuf hands back bytes for string fields that are not UTF-8; names must be text.
    texts = set(used_names(model))
    for graph in graphs(model.graph):
        texts.update(t for n in graph.node for t in (n.op_type, n.domain))
    texts.update(t for p in model.metadata_props for t in (p.key, p.value))  # rewritten on save
    bad = next((t for t in texts if not isinstance(t, str)), None)
    if bad is not None:
        raise ModelReadError(f"{path}: not a valid ONNX model (the name {bad!r} is not UTF-8 "
                             "text)")
    return model, spans


def read_tensor(model_path: AnyPath, tensor: onnx.TensorProto) -> np.ndarray:
    """A tensor's values, from the model or its external data file (located through
    our checks, relative to the model's folder)."""
    try:
        if is_external(tensor):
            file, offset, length = external_data_file(model_path, tensor)
            if isinstance(file, Path):
                count = -1 if length is None else length
                raw = np.fromfile(file, dtype=np.uint8, count=count, offset=offset)
            else:
                data = open_source(file)
                count = data.size - offset if length is None else length
                raw = np.frombuffer(data.read(offset, count), dtype=np.uint8)
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
            expected = data_nbytes(tensor)
            if expected is None or expected != math.prod(tensor.dims) * dtype.itemsize:
                raise ValueError(f"external data of type {dtype} is not supported")
            if raw.size < expected:
                raise ValueError(f"external data has {raw.size} bytes, dims need {expected}")
            return raw[:expected].view(dtype).reshape(tuple(tensor.dims))
        return numpy_helper.to_array(tensor)
    except ModelReadError:
        raise
    except Exception as exc:
        raise ModelReadError(f"{model_path}: tensor {tensor.name!r} is corrupt ({exc})") from None


def inline_tensor(model_path: AnyPath, tensor: onnx.TensorProto) -> onnx.TensorProto:
    """A copy of a tensor with its external data read (through our location checks) into
    raw_data. onnx's own helpers would resolve the location against the current folder."""
    if not is_external(tensor):
        return tensor
    file, offset, length = external_data_file(model_path, tensor)
    need = data_nbytes(tensor)
    data = open_source(file)
    raw = data.read(offset, need if need is not None else (
        length if length is not None else data.size - offset))
    if need is not None and len(raw) < need:
        raise ModelReadError(f"{model_path}: tensor {tensor.name!r}: external data has {len(raw)} "
                             f"bytes, its dims need {need}")
    inline = onnx.TensorProto()
    inline.CopyFrom(tensor)
    del inline.external_data[:]
    inline.data_location = onnx.TensorProto.DEFAULT
    inline.raw_data = raw
    return inline


def stored_bytes(tensor: onnx.TensorProto) -> int:
    """Bytes of a tensor's data as stored (INT4 packs two per byte)."""
    if tensor.HasField("raw_data"):
        return len(tensor.raw_data)
    if is_external(tensor):
        # From the header: numpy_helper.to_array would read the data, resolving its
        # location against the current folder rather than the model's.
        info = {entry.key: entry.value for entry in tensor.external_data}
        return int(info["length"]) if "length" in info else data_nbytes(tensor) or 0
    return numpy_helper.to_array(tensor).nbytes
