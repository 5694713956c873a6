"""ONNX models: initializers and Constant tensors read one at a time; compressed writes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from compress_core.encoded import Dense, Encoded, LowRank
from compress_core.errors import ModelReadError, ModelWriteError
from compress_core.store import Progress, WriteResult
from compress_core.tensorinfo import TensorInfo

from .atomic import atomic_path
from .onnx_emit import decode_spec, emit, required_opset, spec_initializers, spec_nodes
from .onnx_graph import (Location, external_data_file, graphs, is_external, locate, opset_version,
                         tensor_info, used_names, weight_roles)

METADATA_KEY = "modelpress"
FORMAT_VERSION = 1


class OnnxStore:
    """An .onnx model opened for reading (external data is read per tensor, on demand)."""

    format = "onnx"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.model = _load(self.path)
        self._locations = locate(self.model)
        roles = weight_roles(self.model)
        self._tensors = {name: tensor_info(name, loc.tensor, roles.get(name))
                         for name, loc in self._locations.items()}
        self.encodings = _read_encodings(self.path, self.model)

    @property
    def tensors(self) -> Mapping[str, TensorInfo]:
        return self._tensors

    @property
    def file_bytes(self) -> int:
        files = {external_data_file(self.path, loc.tensor)[0]
                 for loc in self._locations.values() if is_external(loc.tensor)}
        return self.path.stat().st_size + sum(f.stat().st_size for f in files)

    def read(self, name: str) -> np.ndarray:
        return _read_tensor(self.path, self._locations[name].tensor)

    # -- compressed content --------------------------------------------------

    def logical_tensors(self) -> Iterator[tuple[str, TensorInfo, Encoded | None, int]]:
        """Tensors as the original model had them.

        Yields (name, info, encoding or None if stored plainly, bytes stored).
        """
        parts = {n for spec in self.encodings.values() for n in spec_initializers(spec)}
        for name, info in self._tensors.items():
            if name not in parts and name not in self.encodings:
                yield name, info, None, info.nbytes
        for name, spec in self.encodings.items():
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(spec["dtype"]))
            info = TensorInfo(name=name, shape=tuple(spec["shape"]), dtype=dtype)
            stored = sum(_stored_bytes(self._locations[p].tensor) for p in spec_initializers(spec)
                         if p in self._locations)
            if spec["layout"] == "dense" and "initializers" not in spec:
                stored = info.nbytes
            yield name, info, self.decode(name), stored

    def decode(self, name: str) -> Encoded:
        """The encoded tree of a tensor this model stores in a modelpress encoding."""
        spec = self.encodings[name]
        if spec["layout"] == "dense" and "initializers" not in spec:
            return Dense(self.read(name))  # pruned: zeros stored densely under W's own name
        try:
            inits = {n: self._locations[n].tensor for n in spec_initializers(spec)}
        except KeyError as exc:
            raise ModelReadError(f"{self.path}: tensor {name!r}: its modelpress encoding names "
                                 f"a missing initializer {exc}") from None
        try:
            return decode_spec(spec, inits, tuple(spec["shape"]))
        except (KeyError, ValueError) as exc:
            raise ModelReadError(f"{self.path}: tensor {name!r}: corrupt modelpress encoding "
                                 f"({exc})") from None

    # -- writing -------------------------------------------------------------

    def write(self, dst: Path, encoded: Mapping[str, Encoded],
              progress: Progress | None = None, *,
              metadata: Mapping[str, str] | None = None) -> WriteResult:
        """Write the model with each encoded tensor replaced by its decoding nodes.

        `metadata` entries are added to the model's metadata_props.
        """
        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        _load_external(self.path, model)
        notes: list[str] = []
        need = max((required_opset(e, self._tensors[n].dtype) for n, e in encoded.items()),
                   default=1)
        model = _ensure_opset(model, need, self.path, notes)
        locations = locate(model)
        taken = used_names(model)
        specs: dict[str, dict[str, Any]] = {}
        tensor_bytes: dict[str, int] = {}

        def fresh(base: str) -> str:
            name, i = base, 1
            while name in taken:
                i += 1
                name = f"{base}_{i}"
            taken.add(name)
            return name

        for i, (name, enc) in enumerate(encoded.items()):
            if progress:
                progress(i, len(encoded), f"writing {name}")
            info = self._tensors[name]
            if isinstance(enc, LowRank):
                from .onnx_lowrank import emit_lowrank, product_note
                out, form = emit_lowrank(model, name, enc, fresh, info.dtype)
                if form == "product":
                    notes.append(product_note(name, enc))
            else:
                out = emit(name, enc, fresh, info.dtype)
            _replace(locations[name], name, out)
            out.spec.update(dtype=int(locations[name].tensor.data_type), shape=list(info.shape),
                            encoding=enc.describe(), origin=locations[name].kind)
            specs[name] = out.spec
            tensor_bytes[name] = out.nbytes
        _set_metadata(model, specs, metadata)
        size = save_checked(model, dst)
        return WriteResult(tensor_bytes=tensor_bytes, file_bytes=size, notes=notes)


def _stored_bytes(tensor: onnx.TensorProto) -> int:
    """Bytes of a tensor's data as stored (INT4 packs two per byte)."""
    if tensor.HasField("raw_data"):
        return len(tensor.raw_data)
    if is_external(tensor):
        info = {entry.key: entry.value for entry in tensor.external_data}
        if "length" in info:
            return int(info["length"])
    return numpy_helper.to_array(tensor).nbytes


def _load(path: Path) -> onnx.ModelProto:
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends
        raise ModelReadError(f"{path}: not a valid ONNX model ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else 'unreadable'})") from None
    if not model.graph.node and not model.graph.initializer:
        raise ModelReadError(f"{path}: not a valid ONNX model (no graph); is it an ONNX file?")
    return model


def _read_tensor(model_path: Path, tensor: onnx.TensorProto) -> np.ndarray:
    try:
        if is_external(tensor):
            file, offset, length = external_data_file(model_path, tensor)
            count = -1 if length is None else length
            raw = np.fromfile(file, dtype=np.uint8, count=count, offset=offset)
            dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
            expected = int(np.prod(tensor.dims, dtype=np.int64)) * dtype.itemsize
            if raw.size < expected:
                raise ValueError(f"external data has {raw.size} bytes, dims need {expected}")
            return raw[:expected].view(dtype).reshape(tuple(tensor.dims))
        return numpy_helper.to_array(tensor)
    except ModelReadError:
        raise
    except Exception as exc:
        raise ModelReadError(f"{model_path}: tensor {tensor.name!r} is corrupt ({exc})") from None


def _load_external(path: Path, model: onnx.ModelProto) -> None:
    """Bring external tensor data into the proto (models under protobuf's 2 GB limit)."""
    for graph in graphs(model.graph):
        for tensor in graph.initializer:
            if is_external(tensor):
                array = _read_tensor(path, tensor)
                tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))


def _ensure_opset(model: onnx.ModelProto, need: int, path: Path,
                  notes: list[str]) -> onnx.ModelProto:
    current = opset_version(model)
    if current >= need:
        return model
    from onnx import version_converter
    try:
        converted = version_converter.convert_version(model, need)
    except Exception as exc:
        raise ModelWriteError(
            f"{path}: this encoding needs ONNX opset {need} (the model has {current}) and "
            f"converting the model failed ({str(exc).splitlines()[0]}); use --bits 8 "
            "--granularity channel, which needs opset 13") from None
    # The converter may pick the newest IR version; keep the lowest that opset allows.
    converted.ir_version = max(model.ir_version, _MIN_IR.get(need, converted.ir_version))
    notes.append(f"ONNX opset raised from {current} to {need} (needed by the encodings used)")
    return converted


_MIN_IR = {13: 7, 19: 9, 21: 10}


def _replace(location: Location, name: str, out: Any) -> None:
    """Swap the tensor's initializer or Constant node for the emitted form."""
    graph = location.graph
    if location.node is not None:
        index = list(graph.node).index(location.node)
        del graph.node[index]
        for j, node in enumerate(out.nodes):
            graph.node.insert(index + j, node)
    else:
        index = [t.name for t in graph.initializer].index(name)
        del graph.initializer[index]
        inputs = [v.name for v in graph.input]
        if name in inputs:  # IR < 4 models list initializers as graph inputs
            del graph.input[inputs.index(name)]
        for j, node in enumerate(out.nodes):
            graph.node.insert(j, node)
    graph.initializer.extend(out.initializers)


def _set_metadata(model: onnx.ModelProto, specs: dict[str, dict[str, Any]],
                  extra: Mapping[str, str] | None = None) -> None:
    # Every modelpress-owned key ("modelpress", "modelpress.source") is rewritten,
    # never inherited from the input.
    kept = [(e.key, e.value) for e in model.metadata_props if not e.key.startswith(METADATA_KEY)]
    del model.metadata_props[:]
    for key, value in kept:
        model.metadata_props.add(key=key, value=value)
    if specs:
        entry = model.metadata_props.add()
        entry.key = METADATA_KEY
        entry.value = json.dumps({"format_version": FORMAT_VERSION, "tensors": specs},
                                 separators=(",", ":"))
    for key, value in (extra or {}).items():
        model.metadata_props.add(key=key, value=value)


def save_checked(model: onnx.ModelProto, dst: Path) -> int:
    """Save atomically after onnx.checker (full check) accepts the file."""
    if model.ByteSize() > (2**31 - 1):
        raise ModelWriteError(f"{dst}: the compressed model is over 2 GB, protobuf's limit; "
                              "external data output is not supported yet")
    with atomic_path(dst) as tmp:
        onnx.save_model(model, str(tmp))
        try:
            onnx.checker.check_model(str(tmp), full_check=True)
        except Exception as exc:
            raise ModelWriteError(f"{dst}: the compressed model fails onnx.checker "
                                  f"({str(exc).splitlines()[0]}); nothing was written") from None
        size = tmp.stat().st_size
    return size


def _read_encodings(path: Path, model: onnx.ModelProto) -> dict[str, dict[str, Any]]:
    raw = next((p.value for p in model.metadata_props if p.key == METADATA_KEY), None)
    if raw is None:
        return {}
    try:
        doc = json.loads(raw)
        if doc.get("format_version", 0) > FORMAT_VERSION:
            raise ModelReadError(f"{path}: written by a newer modelpress; upgrade modelpress")
        return dict(doc["tensors"])
    except ModelReadError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelReadError(f"{path}: corrupt modelpress metadata ({exc})") from None


def write_decompressed(store: OnnxStore, dst: Path) -> WriteResult:
    """Write the model with each modelpress encoding replaced by a dense initializer."""
    model = onnx.ModelProto()
    model.CopyFrom(store.model)
    _load_external(store.path, model)
    restored: dict[str, int] = {}
    for name, spec in store.encodings.items():
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(spec["dtype"]))
        array = store.decode(name).decode().astype(dtype)
        if spec["layout"] == "lowrank":
            from .onnx_lowrank import restore_consumer
            try:
                restore_consumer(model, spec)
            except (KeyError, ValueError) as exc:
                raise ModelReadError(f"{store.path}: tensor {name!r}: corrupt modelpress "
                                     f"encoding ({exc})") from None
        graph = _remove_encoding(model, name, spec)
        graph.initializer.append(numpy_helper.from_array(array, name))
        restored[name] = array.nbytes
    _set_metadata(model, {})
    return WriteResult(tensor_bytes=restored, file_bytes=save_checked(model, dst))


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
