"""What batch runs need to know of an ONNX file on disk without reading its weights:
the external data files it names and its modelpress metadata.

Kept apart so that `formats.discover` and `formats.outputs` load onnx only when a
tree holds an ONNX model.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

import onnx

from modelpress.formats.onnx.graph import external_data_file, graphs, is_external, locate


def relative_locations(path: Path) -> list[str] | None:
    """The external-data locations a model names that stay inside its folder, sorted;
    None when the file cannot be parsed."""
    try:
        proto = onnx.load(str(path), load_external_data=False)
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


def data_files(path: Path) -> list[Path]:
    """The external data files a model's tensors are read from (checked to lie inside
    its folder), sorted; [] when the file cannot be parsed."""
    try:
        model = onnx.load(str(path), load_external_data=False)
        files = {external_data_file(path, loc.tensor)[0]
                 for loc in locate(model).values() if is_external(loc.tensor)}
    except Exception:  # unreadable: its own file is all we can name
        return []
    return sorted(path.parent / f.name for f in files)


def metadata_value(path: Path, key: str) -> str | None:
    """The value of one `metadata_props` entry of a model, or None."""
    model = onnx.load(str(path), load_external_data=False)
    return next((p.value for p in model.metadata_props if p.key == key), None)
