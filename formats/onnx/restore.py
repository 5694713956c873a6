"""`modelpress decompress` for ONNX: encodings replaced by dense initializers again."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from modelpress.core.errors import ModelReadError
from modelpress.core.store import WriteResult

from modelpress.formats.onnx.borrow import borrow, give_back
from modelpress.formats.onnx.chain import drop_unused_functions
from modelpress.formats.onnx.emit import spec_initializers, spec_nodes
from modelpress.formats.onnx.graph import graphs
from modelpress.formats.onnx.store import OnnxStore, _check_source, _set_metadata
from modelpress.formats.onnx.write import place_remaining, save_model, staged, wants_external


def write_decompressed(store: OnnxStore, dst: Path, external_data: str = "auto") -> WriteResult:
    """Write the model with each modelpress encoding replaced by a dense initializer.

    One tensor is decoded at a time; with external data (as the input had, or
    `external_data="always"`) each goes to the data file before the next. The
    working copy borrows the input's large tensors (modelpress.formats.onnx.borrow)
    instead of holding them twice, and the encodings' nodes and initializers
    leave each graph in one pass: removing them tensor by tensor rebuilt every
    initializer list (copying each tensor's bytes) once per encoded tensor.
    """
    dst = Path(dst)
    model, sources = borrow(store.model)
    _check_source(store.path, model)
    restored: dict[str, int] = {}
    with staged(dst) as stage:
        data = stage.open_data() if wants_external(external_data,
                                                    store.file_bytes) else None
        homes = _homes(model, store.encodings)
        for name, spec in store.encodings.items():
            if spec["layout"] == "lowrank" or "consumer" in spec:
                from modelpress.formats.onnx.lowrank import restore_consumer as restore_lowrank
                from modelpress.formats.onnx.quant import restore_consumer as restore_kernel
                restore = restore_lowrank if spec["layout"] == "lowrank" else restore_kernel
                try:
                    restore(model, spec)
                except (KeyError, ValueError) as exc:
                    raise ModelReadError(f"{store.path}: tensor {name!r}: corrupt modelpress "
                                         f"encoding ({exc})") from None
        _remove_encodings(model, store.encodings)
        for name, spec in store.encodings.items():
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(spec["dtype"]))
            array = store.decode(name).decode().astype(dtype)
            tensor = numpy_helper.from_array(array, name)
            restored[name] = array.nbytes
            del array
            if data is not None:
                data.move(tensor)
            homes[name].initializer.append(tensor)
            del tensor
        give_back(model, sources)
        drop_unused_functions(model)
        place_remaining(model, store.path, data)
        _set_metadata(model, {})
        size = save_model(model, dst, stage, store.path, external_data)
    return WriteResult(tensor_bytes=restored, file_bytes=size)


def _owned(spec: dict[str, Any], name: str) -> tuple[set[str], set[str]]:
    """The node names and initializer names that encode `name`."""
    return set(spec_nodes(spec)), set(spec_initializers(spec)) | {name}


def _homes(model: onnx.ModelProto, encodings: dict[str, dict[str, Any]]) -> dict[str, onnx.GraphProto]:
    """For each encoded tensor, the graph its dense initializer goes to: the outermost
    graph holding any of its nodes or initializers."""
    owner: dict[str, str] = {}
    for name, spec in encodings.items():
        nodes, inits = _owned(spec, name)
        for key in [("node", n) for n in nodes] + [("init", i) for i in inits]:
            owner.setdefault(key, name)
    homes: dict[str, onnx.GraphProto] = {}
    for graph in graphs(model.graph):  # outer graphs first: W's home is the outermost
        for node in graph.node:
            name = owner.get(("node", node.name))
            if name is not None:
                homes.setdefault(name, graph)
        for tensor in graph.initializer:
            name = owner.get(("init", tensor.name))
            if name is not None:
                homes.setdefault(name, graph)
    missing = [name for name in encodings if name not in homes]
    if missing:
        raise ModelReadError(f"tensor {missing[0]!r}: its modelpress encoding is missing from "
                             "the graph")
    return homes


def _remove_encodings(model: onnx.ModelProto, encodings: dict[str, dict[str, Any]]) -> None:
    """Delete the nodes and initializers of every encoding, in one pass over each graph."""
    nodes: set[str] = set()
    inits: set[str] = set()
    for name, spec in encodings.items():
        owned_nodes, owned_inits = _owned(spec, name)
        nodes |= owned_nodes
        inits |= owned_inits
    for graph in graphs(model.graph):
        _delete(graph.node, lambda n: n.name in nodes)
        _delete(graph.initializer, lambda t: t.name in inits)


def _delete(field: Any, doomed: Any) -> None:
    """Remove the entries of a repeated message field for which `doomed` is true, in place
    (from the end, so no entry is copied)."""
    for i in reversed([i for i, entry in enumerate(field) if doomed(entry)]):
        del field[i]
