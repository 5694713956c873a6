"""Where tensors live in an ONNX model and which ones are weights."""

from __future__ import annotations

import math
import os
import posixpath
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import onnx
from onnx import helper, numpy_helper

from modelpress.core.errors import ModelReadError
from modelpress.core.tensorinfo import TensorInfo

from modelpress.formats.location import AnyPath, ObjectPath, file_size, is_file


@dataclass
class Location:
    """A tensor's home: an initializer of `graph`, or the `value` of a Constant node."""

    graph: onnx.GraphProto
    tensor: onnx.TensorProto
    node: onnx.NodeProto | None = None  # the Constant node, if any

    @property
    def kind(self) -> str:
        return "constant" if self.node is not None else "initializer"


def graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """A graph and every subgraph nested in it (If/Loop/Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from graphs(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from graphs(sub)


def locate(model: onnx.ModelProto) -> dict[str, Location]:
    """Every initializer and Constant-node tensor, by name, in graph order."""
    found: dict[str, Location] = {}
    for graph in graphs(model.graph):
        for tensor in graph.initializer:
            found.setdefault(tensor.name, Location(graph, tensor))
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx") and node.output:
                for attr in node.attribute:
                    if attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                        found.setdefault(node.output[0], Location(graph, attr.t, node))
    return found


# Channel axis, block axis and block span of a weight (see TensorInfo).
Axes = tuple[int, int, int]


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((a.i for a in node.attribute if a.name == name), default)


def _matmul_axes(node: onnx.NodeProto, dims: list[int]) -> Axes:
    return len(dims) - 1, len(dims) - 2, 1


def _gemm_axes(node: onnx.NodeProto, dims: list[int]) -> Axes:
    return (0, 1, 1) if _attr(node, "transB", 0) else (1, 0, 1)


def _conv_axes(node: onnx.NodeProto, dims: list[int]) -> Axes:
    # [M, C/g, *kernel]: output channel m sums over its C/g * kernel weights.
    return 0, 1, len(dims) - 1


def _conv_transpose_axes(node: onnx.NodeProto, dims: list[int]) -> Axes:
    """[C, M/g, *kernel]. Output channel j sums over axes 0 and the kernel's (not one run
    of axes), so: grouped (depthwise) kernels are grouped per input channel over its
    [M/g, *kernel] slab (one output channel's whole kernel when M/g is 1); a single input
    channel's kernel per output channel; else along the input channels."""
    if _attr(node, "group", 1) > 1:
        return 0, 1, len(dims) - 1
    if dims[0] == 1 and len(dims) >= 3:
        return 1, 2, len(dims) - 2
    return 1, 0, 1


def _gather_axes(node: onnx.NodeProto, dims: list[int]) -> Axes | None:
    return (0, len(dims) - 1, 1) if _attr(node, "axis", 0) == 0 else None


def _recurrent_axes(node: onnx.NodeProto, dims: list[int]) -> Axes | None:
    # W [directions, gates * hidden, inputs] and R [directions, gates * hidden, hidden].
    return (1, 2, 1) if len(dims) == 3 else None


# op type -> ((weight input index, axes from (node, dims) or None), ...)
_WEIGHT_INPUTS = {
    "MatMul": ((1, _matmul_axes),),
    "Gemm": ((1, _gemm_axes),),
    "Conv": ((1, _conv_axes),),
    "ConvTranspose": ((1, _conv_transpose_axes),),
    "Gather": ((0, _gather_axes),),
    "LSTM": ((1, _recurrent_axes), (2, _recurrent_axes)),
    "GRU": ((1, _recurrent_axes), (2, _recurrent_axes)),
    "RNN": ((1, _recurrent_axes), (2, _recurrent_axes)),
}


def weight_roles(model: onnx.ModelProto) -> dict[str, tuple[str, int, int, int]]:
    """Tensor name -> (op type, channel axis, block axis, block span) for tensors used as
    weights."""
    dims = {name: [int(d) for d in loc.tensor.dims] for name, loc in locate(model).items()}
    roles: dict[str, tuple[str, int, int, int]] = {}
    for graph in graphs(model.graph):
        for node in graph.node:
            specs = _WEIGHT_INPUTS.get(node.op_type, ()) \
                if node.domain in ("", "ai.onnx") else ()
            for index, axes_of in specs:
                name = node.input[index] if len(node.input) > index else ""
                if name not in dims or len(dims[name]) < 2 or name in roles:
                    continue
                axes = axes_of(node, dims[name])
                if axes is not None:
                    roles[name] = (node.op_type, *axes)
    return roles


def other_uses(model: onnx.ModelProto, roles: dict[str, Any]) -> dict[str, str]:
    """Why each tensor that is not a weight is not one: where the model reads it."""
    reads: dict[str, list[str]] = {}
    for graph in graphs(model.graph):
        for node in graph.node:
            for index, name in enumerate(node.input):
                where = f"{node.op_type} input {index}"
                if name and name not in roles and where not in reads.setdefault(name, []):
                    reads[name].append(where)
    uses = {}
    for name, loc in locate(model).items():
        if name in roles:
            continue
        if len(loc.tensor.dims) < 2:
            uses[name] = (f"it is {len(loc.tensor.dims)}-D: a bias, norm or table; stages "
                          "change tensors of 2 or more dims unless named")
        elif name in reads:
            shown = ", ".join(reads[name][:3]) + (", ..." if len(reads[name]) > 3 else "")
            uses[name] = f"{shown}: not a weight input of a known op"
        else:
            uses[name] = "no node reads it"
    return uses


def tensor_info(name: str, tensor: onnx.TensorProto, role: tuple[str, int, int, int] | None,
                sensitive: str | None = None, sensitive_share: float | None = None,
                use: str | None = None) -> TensorInfo:
    """TensorInfo from a TensorProto's header fields (no data is read)."""
    try:
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type))
    except (KeyError, ValueError, TypeError):
        dtype = np.dtype(object)
    return TensorInfo(name=name, shape=tuple(int(d) for d in tensor.dims), dtype=dtype,
                      weight_like=role is not None,
                      channel_axis=role[1] if role else None,
                      block_axis=role[2] if role else None,
                      role=role[0] if role else None, format="onnx", sensitive=sensitive,
                      sensitive_share=sensitive_share if sensitive else None,
                      block_span=role[3] if role else 1, use=None if role else use)


def _inside_folder(model_path: AnyPath, location: str, where: str) -> AnyPath:
    """The file a relative location names beside the model, refused if it leads out."""
    if isinstance(model_path, ObjectPath):
        inside = posixpath.normpath(location.replace("\\", "/"))
        if inside == ".." or inside.startswith("../"):
            raise ModelReadError(f"{where}: external data location {location!r} points outside "
                                 "the model's folder; refusing to read it")
        return model_path.parent / inside
    base = model_path.parent.resolve()
    try:
        target = (base / location).resolve()
    except RuntimeError:  # a loop of symbolic links
        raise ModelReadError(f"{where}: external data location {location!r} is a loop of "
                             "symbolic links; refusing to read it") from None
    if base != target and base not in target.parents:
        raise ModelReadError(f"{where}: external data location {location!r} points outside the "
                             "model's folder; refusing to read it")
    return target


def external_data_file(model_path: AnyPath, tensor: onnx.TensorProto
                       ) -> tuple[AnyPath, int, int | None]:
    """The checked (file, offset, length) of a tensor stored as external data.

    A location must be a relative path inside the model's folder (for a model
    in storage, its prefix): absolute paths and paths that climb out (`../`)
    are refused, as are symbolic links that lead outside it.
    """
    info = {entry.key: entry.value for entry in tensor.external_data}
    location = info.get("location", "")
    where = f"{model_path}: tensor {tensor.name!r}"
    if not isinstance(location, str) or "\0" in location:  # protobuf gives bytes for non-UTF-8
        raise ModelReadError(f"{where}: external data location {location!r} is not a valid "
                             "path; the model is damaged")
    if not location or os.path.isabs(location) or location.startswith(("/", "\\")):
        raise ModelReadError(f"{where}: external data location {location!r} is not a relative "
                             "path inside the model's folder; refusing to read it")
    target = _inside_folder(model_path, location, where)
    if not is_file(target):
        raise ModelReadError(f"{where}: external data file {location!r} is missing; keep it "
                             "beside the model")
    try:
        offset = int(info.get("offset", 0))
        length = int(info["length"]) if "length" in info else None
    except (ValueError, TypeError):
        raise ModelReadError(f"{where}: external data offset/length are not integers") from None
    if offset < 0 or (length is not None and length < 0):
        raise ModelReadError(f"{where}: external data offset {offset} or length {length} is "
                             "negative; the model is damaged")
    size = file_size(target)
    if offset > size or (length is not None and offset + length > size):
        raise ModelReadError(f"{where}: external data file {location!r} is too short "
                             f"({size} bytes) for offset {offset} and length {length}")
    return target, offset, length


# Types stored two elements per byte in raw_data.
_PACKED_4BIT = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4,
                getattr(onnx.TensorProto, "FLOAT4E2M1", -1)}
_MAX_BYTES = 1 << 62


def data_nbytes(tensor: onnx.TensorProto) -> int | None:
    """Bytes the tensor's data takes as raw_data or external data (None for strings)."""
    if tensor.data_type == onnx.TensorProto.STRING:
        return None
    count = math.prod(tensor.dims)
    if tensor.data_type in _PACKED_4BIT:
        return (count + 1) // 2
    return count * np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize


def check_tensor(model_path: AnyPath, tensor: onnx.TensorProto, name: str,
                 raw_length: int | None = None) -> None:
    """Refuse a tensor whose header fields cannot describe real data (no data is loaded).

    `raw_length`, when known, is the length of its raw_data (reading the field
    through protobuf copies the bytes).
    """
    where = f"{model_path}: tensor {name!r}"
    try:
        helper.tensor_dtype_to_np_dtype(tensor.data_type)
    except (KeyError, ValueError, TypeError):
        raise ModelReadError(f"{where} has an invalid data type ({tensor.data_type}); the model "
                             "is damaged") from None
    if any(d < 0 for d in tensor.dims):
        raise ModelReadError(f"{where} has negative dims {list(tensor.dims)}; the model is damaged")
    need = data_nbytes(tensor)
    if need is not None and need > _MAX_BYTES:
        raise ModelReadError(f"{where} has dims {list(tensor.dims)} too large for any file; "
                             "the model is damaged")
    if is_external(tensor):
        inline = len(tensor.raw_data) if raw_length is None else raw_length
        if inline:
            # onnxruntime runs the external bytes, onnx.numpy_helper reads raw_data: two
            # tensors under one name, and no way to know which one the author meant.
            raise ModelReadError(f"{where} is marked as external data and also holds {inline} "
                                 "bytes of raw_data (onnxruntime reads the external file, other "
                                 "tools raw_data); the model is ambiguous: clear one of them")
        file, offset, length = external_data_file(model_path, tensor)
        have = length if length is not None else file_size(file) - offset
        if need is not None and have < need:
            raise ModelReadError(f"{where}: external data holds {have} bytes but its dims "
                                 f"{list(tensor.dims)} need {need}; the model is damaged")
    elif tensor.HasField("raw_data"):
        have = len(tensor.raw_data) if raw_length is None else raw_length
        if need is not None and have != need:
            raise ModelReadError(f"{where}: raw_data holds {have} bytes but its "
                                 f"dims {list(tensor.dims)} need {need}; the model is damaged")
    else:
        # Typed fields (float_data, int32_data...) hold small tensors; decoding checks their count.
        try:
            numpy_helper.to_array(tensor)
        except Exception as exc:
            raise ModelReadError(f"{where} is corrupt ({' '.join(str(exc).split())[:200]}); "
                                 "the model is damaged") from None


def is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.data_location == onnx.TensorProto.EXTERNAL


def used_names(model: onnx.ModelProto) -> set[str]:
    """Every value name anywhere in the model (to make fresh names)."""
    names: set[str] = set()
    for graph in graphs(model.graph):
        names.update(t.name for t in graph.initializer)
        names.update(t.values.name for t in graph.sparse_initializer)
        names.update(v.name for v in graph.input)
        names.update(v.name for v in graph.output)
        for node in graph.node:
            names.update(node.input)
            names.update(node.output)
            if node.name:
                names.add(node.name)
    return names


def fresh_name(taken: set[str], base: str) -> str:
    """`base`, or `base_2`, `base_3`... : the first not in `taken`, which then holds it."""
    name, i = base, 1
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    taken.add(name)
    return name


def opset_version(model: onnx.ModelProto) -> int:
    """The model's default-domain opset."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return 1


def consumers(model: onnx.ModelProto, name: str) -> list[tuple[onnx.GraphProto, onnx.NodeProto]]:
    """Every node (in any graph) that reads `name`, once per use."""
    found = []
    for graph in graphs(model.graph):
        for node in graph.node:
            found += [(graph, node)] * list(node.input).count(name)
    return found


def is_output(model: onnx.ModelProto, name: str) -> bool:
    """Whether `name` is an output of the model's graph or of a subgraph."""
    return any(name in [o.name for o in graph.output] for graph in graphs(model.graph))
