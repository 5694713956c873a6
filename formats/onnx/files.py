"""What batch runs need to know of an ONNX file on disk without reading its weights:
the external data files it names and its modelpress metadata.

Kept apart so that `formats.discover` and `formats.outputs` load onnx only when a
tree holds an ONNX model.
"""

from __future__ import annotations

import os
from pathlib import PurePosixPath

import onnx

from modelpress.formats.location import AnyPath, ObjectPath, read_bytes
from modelpress.formats.onnx.graph import external_data_file, graphs, is_external, locate


def load_proto(path: AnyPath) -> onnx.ModelProto:
    """A model without its external data, from a file or from storage (read whole)."""
    if isinstance(path, ObjectPath):
        return onnx.load_model_from_string(read_bytes(path))
    return onnx.load(str(path), load_external_data=False)


def relative_locations(path: AnyPath) -> list[str] | None:
    """The external-data locations a model names that stay inside its folder, sorted;
    None when the file cannot be parsed."""
    try:
        proto = load_proto(path)
    except Exception:  # protobuf's DecodeError and friends: reported when compressed
        return None
    locations = set()
    for graph in graphs(proto.graph):
        for tensor in graph.initializer:
            if is_external(tensor):
                location = {e.key: e.value for e in tensor.external_data}.get("location", "")
                inside = PurePosixPath(os.path.normpath(location)) if location else None
                if inside and not inside.is_absolute() and ".." not in inside.parts:
                    locations.add(str(inside))
    return sorted(locations)


def data_files(path: AnyPath) -> list[AnyPath]:
    """The external data files a model's tensors are read from (checked to lie inside
    its folder), sorted; [] when the file cannot be parsed."""
    try:
        model = load_proto(path)
        files = {external_data_file(path, loc.tensor)[0]
                 for loc in locate(model).values() if is_external(loc.tensor)}
    except Exception:  # unreadable: its own file is all we can name
        return []
    return sorted(path.parent / f.name for f in files)


def metadata_value(path: AnyPath, key: str) -> str | None:
    """The value of one `metadata_props` entry of a model, or None."""
    model = load_proto(path)
    return next((p.value for p in model.metadata_props if p.key == key), None)
