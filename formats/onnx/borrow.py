"""A working copy of an ONNX model that borrows its large tensors from the source.

The writer edits a copy of the input model. A full copy would hold every
weight a second time, and each whole-model pass over it (onnx's version
converter, onnx.checker) would serialize them all once more. The copy made
here holds every field of the model except the data of large tensors
(initializers and Constant values with at least BORROW_FROM bytes of
raw_data): each of those keeps its header (name, type, dims) and points, as
an external-data reference to BORROWED, at the source tensor it stands for.
The version converter carries such references through unchanged.
`give_back` copies the source tensors into whatever borrowed tensors the
output still has, so the saved model is the same as one made from a full
copy.
"""

from __future__ import annotations

from typing import Callable, Iterator

import onnx
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from modelpress.formats.onnx.graph import graphs

# The location of a borrowed tensor's "external data"; its offset is the index
# of the source tensor. Never written: `give_back` replaces every one.
BORROWED = "<modelpress borrowed tensor>"
# Tensors with less raw_data are copied (onnx.save's external-data threshold).
BORROW_FROM = 1024

RawLength = Callable[[onnx.TensorProto], "int | None"]


def borrow(model: onnx.ModelProto, raw_length: RawLength = lambda tensor: None,
           location: str = BORROWED) -> tuple[onnx.ModelProto, list[onnx.TensorProto]]:
    """A copy of `model` whose large tensors are borrowed, and the source tensors they name.

    `raw_length(tensor)` gives the length of a tensor's raw_data where it is
    known without reading the field (which copies the bytes), else None.
    Tensors already borrowed (by another `location`) are copied as they are.
    """
    sources: list[onnx.TensorProto] = []
    copy = onnx.ModelProto()
    _copy_fields(model, copy, skip={"graph"})
    if model.HasField("graph"):
        _copy_graph(model.graph, copy.graph, _Borrowing(sources, raw_length, location))
    return copy, sources


def is_borrowed(tensor: onnx.TensorProto, location: str = BORROWED) -> bool:
    """Whether a tensor of a `borrow` copy still stands for a source tensor."""
    return (tensor.data_location == onnx.TensorProto.EXTERNAL
            and any(e.key == "location" and e.value == location for e in tensor.external_data))


def give_back(model: onnx.ModelProto, sources: list[onnx.TensorProto],
              location: str = BORROWED) -> None:
    """Replace every tensor still borrowed (through `location`) in `model` by a copy of its
    source tensor."""
    for tensor in _tensor_slots(model):
        if is_borrowed(tensor, location):
            index = next(int(e.value) for e in tensor.external_data if e.key == "offset")
            tensor.CopyFrom(sources[index])


def checkable(model: onnx.ModelProto, external: bool = False) -> onnx.ModelProto:
    """A copy of a `borrow` copy for onnx.checker's structural check (no shape inference).

    The in-memory checker would look for a borrowed tensor's data file, so each
    (and with `external`, each tensor in an external data file) becomes an
    empty tensor of its type; the structural check does not relate initializer
    shapes to their uses, and the store checks each tensor's data size against
    its dims when the model is opened.
    """
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for tensor in _tensor_slots(probe):
        if is_borrowed(tensor) or (external and
                                   tensor.data_location == onnx.TensorProto.EXTERNAL):
            del tensor.external_data[:]
            tensor.ClearField("data_location")
            del tensor.dims[:]
            tensor.dims.append(0)
            tensor.raw_data = b""
    return probe


def _tensor_slots(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Initializers and Constant values of every graph (the tensors `borrow` may borrow)."""
    for graph in graphs(model.graph):
        yield from graph.initializer
        for node in graph.node:
            if node.op_type == "Constant":
                yield from (a.t for a in node.attribute
                            if a.type == onnx.AttributeProto.TENSOR and a.HasField("t"))


class _Borrowing:
    """What one `borrow` collects and how: the sources, known lengths, the location."""

    def __init__(self, sources: list[onnx.TensorProto], raw_length: RawLength,
                 location: str) -> None:
        self.sources, self.raw_length, self.location = sources, raw_length, location

    def large(self, tensor: onnx.TensorProto) -> bool:
        if not tensor.HasField("raw_data"):
            return False
        known = self.raw_length(tensor)
        return (len(tensor.raw_data) if known is None else known) >= BORROW_FROM


def _copy_graph(src: onnx.GraphProto, dst: onnx.GraphProto, how: _Borrowing) -> None:
    _copy_fields(src, dst, skip={"initializer", "node"})
    for tensor in src.initializer:
        _copy_tensor(tensor, dst.initializer.add(), how)
    for node in src.node:
        _copy_node(node, dst.node.add(), how)


def _copy_node(src: onnx.NodeProto, dst: onnx.NodeProto, how: _Borrowing) -> None:
    _copy_fields(src, dst, skip={"attribute"})
    for attr in src.attribute:
        out = dst.attribute.add()
        if attr.type == onnx.AttributeProto.GRAPH and attr.HasField("g"):
            _copy_fields(attr, out, skip={"g"})
            _copy_graph(attr.g, out.g, how)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            _copy_fields(attr, out, skip={"graphs"})
            for graph in attr.graphs:
                _copy_graph(graph, out.graphs.add(), how)
        elif (src.op_type == "Constant" and attr.type == onnx.AttributeProto.TENSOR
              and attr.HasField("t") and how.large(attr.t)):
            _copy_fields(attr, out, skip={"t"})
            _copy_tensor(attr.t, out.t, how)
        else:
            out.CopyFrom(attr)


def _copy_tensor(src: onnx.TensorProto, dst: onnx.TensorProto, how: _Borrowing) -> None:
    if not how.large(src):
        dst.CopyFrom(src)
        return
    _copy_fields(src, dst, skip={"raw_data", "data_location", "external_data"})
    dst.data_location = onnx.TensorProto.EXTERNAL
    dst.external_data.add(key="location", value=how.location)
    dst.external_data.add(key="offset", value=str(len(how.sources)))
    how.sources.append(src)


def _copy_fields(src: Message, dst: Message, skip: set[str]) -> None:
    """Copy the set fields of `src` into `dst`, except those named in `skip`.

    (Fields unknown to the installed onnx are not copied for the messages on
    the way to a borrowed tensor: its graphs, nodes, attributes and itself.)
    Skipped fields are not read: reading a tensor's raw_data would copy it.
    """
    for field in src.DESCRIPTOR.fields:
        if field.name in skip:
            continue
        if _repeated(field):
            values = getattr(src, field.name)
            if len(values):
                getattr(dst, field.name).extend(values)
        elif src.HasField(field.name):  # ONNX's messages are proto2: every field has presence
            if field.type == field.TYPE_MESSAGE:
                getattr(dst, field.name).CopyFrom(getattr(src, field.name))
            else:
                setattr(dst, field.name, getattr(src, field.name))


def _repeated(field: FieldDescriptor) -> bool:
    # protobuf 6 and later name it is_repeated; `label` went away in 7.
    repeated = getattr(field, "is_repeated", None)
    return repeated if repeated is not None else field.label == field.LABEL_REPEATED


__all__ = ["BORROWED", "BORROW_FROM", "borrow", "checkable", "give_back", "is_borrowed"]
