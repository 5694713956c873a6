"""`modelpress decompress` for ONNX: encodings replaced by dense initializers again."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from modelpress.core.errors import ModelReadError
from modelpress.core.store import WriteResult

from modelpress.formats.onnx.chain import drop_unused_functions
from modelpress.formats.onnx.emit import spec_initializers, spec_nodes
from modelpress.formats.onnx.graph import graphs
from modelpress.formats.onnx.store import OnnxStore, _check_source, _set_metadata
from modelpress.formats.onnx.write import place_remaining, save_model, staged, wants_external


def write_decompressed(store: OnnxStore, dst: Path, external_data: str = "auto") -> WriteResult:
    """Write the model with each modelpress encoding replaced by a dense initializer.

    One tensor is decoded at a time; with external data (as the input had, or
    `external_data="always"`) each goes to the data file before the next.
    """
    dst = Path(dst)
    model = onnx.ModelProto()
    model.CopyFrom(store.model)
    _check_source(store.path, model)
    restored: dict[str, int] = {}
    with staged(dst) as stage:
        data = stage.open_data() if wants_external(external_data,
                                                    store.file_bytes) else None
        for name, spec in store.encodings.items():
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(spec["dtype"]))
            array = store.decode(name).decode().astype(dtype)
            if spec["layout"] == "lowrank" or "consumer" in spec:
                from modelpress.formats.onnx.lowrank import restore_consumer as restore_lowrank
                from modelpress.formats.onnx.quant import restore_consumer as restore_kernel
                restore = restore_lowrank if spec["layout"] == "lowrank" else restore_kernel
                try:
                    restore(model, spec)
                except (KeyError, ValueError) as exc:
                    raise ModelReadError(f"{store.path}: tensor {name!r}: corrupt modelpress "
                                         f"encoding ({exc})") from None
            graph = _remove_encoding(model, name, spec)
            tensor = numpy_helper.from_array(array, name)
            restored[name] = array.nbytes
            del array
            if data is not None:
                data.move(tensor)
            graph.initializer.append(tensor)
        drop_unused_functions(model)
        place_remaining(model, store.path, data)
        _set_metadata(model, {})
        size = save_model(model, dst, stage, store.path, external_data)
    return WriteResult(tensor_bytes=restored, file_bytes=size)


def _remove_encoding(model: onnx.ModelProto, name: str, spec: dict[str, Any]) -> onnx.GraphProto:
    """Delete the nodes and initializers that encode `name`; return the graph that held them."""
    owned_nodes = set(spec_nodes(spec))
    owned_inits = set(spec_initializers(spec)) | {name}
    home = None
    for graph in graphs(model.graph):  # outer graphs first: W's home is the outermost
        keep = [n for n in graph.node if n.name not in owned_nodes]
        if len(keep) != len(graph.node):
            home = home or graph
            del graph.node[:]
            graph.node.extend(keep)
        inits = [t for t in graph.initializer if t.name not in owned_inits]
        if len(inits) != len(graph.initializer):
            home = home or graph
            del graph.initializer[:]
            graph.initializer.extend(inits)
    if home is None:
        raise ModelReadError(f"tensor {name!r}: its modelpress encoding is missing from the graph")
    return home
