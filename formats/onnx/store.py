"""ONNX models: initializers and Constant tensors read one at a time; compressed writes."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import onnx
from onnx import numpy_helper

from modelpress.core.encoded import Dense, Encoded, LowRank
from modelpress.core.errors import ModelReadError, ModelWriteError
from modelpress.core.store import EncodedItems, Progress, WriteResult, in_store_order
from modelpress.core.tensorinfo import TensorInfo

from modelpress.formats.onnx.emit import (decode_spec, emit, required_opset, spec_initializers, spec_nodes)
from modelpress.formats.onnx.borrow import borrow, checkable, give_back, is_borrowed
from modelpress.formats.onnx.chain import DOMAIN, add_function
from modelpress.formats.onnx.meta import decode_doc, encode_doc
from modelpress.formats.onnx.sites import OnnxTarget, kernel_site, sensitive_tensors, widen_allowed
from modelpress.formats.onnx.graph import (Location, check_tensor, data_nbytes, external_data_file, graphs, is_external, locate, opset_version, tensor_info, used_names, weight_roles)
from modelpress.formats.onnx.wire import RawSpans, is_binary, map_tensor, mappable, parse_mapped
from modelpress.formats.onnx.write import place_remaining, save_model, staged, wants_external
from modelpress.formats.tree_check import check_tree

METADATA_KEY = "modelpress"
FORMAT_VERSION = 1


class OnnxStore:
    """An .onnx model opened for reading (external data is read per tensor, on demand)."""

    format = "onnx"

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.model, self._spans = _load(self.path)
        self._locations = locate(self.model)
        for name, loc in self._locations.items():
            check_tensor(self.path, loc.tensor, name, self._spans.length(loc.tensor))
        roles = weight_roles(self.model)
        sizes = {name: int(np.prod(loc.tensor.dims, dtype=np.int64))
                 for name, loc in self._locations.items()}
        sensitive, share = sensitive_tensors(self.model, roles, sizes)
        self._tensors = {name: tensor_info(name, loc.tensor, roles.get(name),
                                           sensitive.get(name), share)
                         for name, loc in self._locations.items()}
        self.encodings = _read_encodings(self.path, self.model, set(self._locations))

    @property
    def tensors(self) -> Mapping[str, TensorInfo]:
        return self._tensors

    def calibrate(self, calibration: Path, selected: set[str]) -> list[str]:
        """Attach input statistics from `calibration` (an .npz of model inputs) to the
        MatMul/Gemm weights among `selected` (those the recipe changes); notes for the
        report. Without such weights the model is not run."""
        from modelpress.formats.onnx.calibrate import input_stats
        weights = {name: info.shape[info.block_axis] for name, info in self._tensors.items()
                   if name in selected and info.role in ("MatMul", "Gemm")
                   and len(info.shape) == 2 and info.block_axis is not None}
        if not weights:
            return [f"--calibration {calibration}: not used (the recipe changes no MatMul/Gemm "
                    "weight)"]
        stats, notes = input_stats(self.path, self.model, Path(calibration), weights)
        for name, found in stats.items():
            self._tensors[name] = dataclasses.replace(self._tensors[name], input_stats=found)
        return notes

    @property
    def data_files(self) -> set[Path]:
        """The external data files the model's tensors live in."""
        return {external_data_file(self.path, loc.tensor)[0]
                for loc in self._locations.values() if is_external(loc.tensor)}

    @property
    def file_bytes(self) -> int:
        return self.path.stat().st_size + sum(f.stat().st_size for f in self.data_files)

    def read(self, name: str) -> np.ndarray:
        """One tensor's values (read-only)."""
        tensor = self._locations[name].tensor
        span = self._spans.span(tensor)
        if span is not None and mappable(tensor):
            try:  # straight from the page cache: no copy of raw_data
                return map_tensor(self.path, tensor, span[0])
            except (OSError, ValueError) as exc:
                raise ModelReadError(f"{self.path}: cannot read tensor {tensor.name!r}: "
                                     f"{exc}") from None
        return _read_tensor(self.path, tensor)

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
        try:
            if spec["layout"] == "dense" and "initializers" not in spec:
                tree: Encoded = Dense(self.read(name))  # pruned: zeros stored under W's own name
            else:
                inits = {n: inline_tensor(self.path, self._locations[n].tensor)
                         for n in spec_initializers(spec)}
                tree = decode_spec(spec, inits, tuple(spec["shape"]))
            check_tree(tree, tuple(spec["shape"]))
            return tree
        except ModelReadError as exc:  # e.g. an unknown layout: name the file and tensor
            if str(exc).startswith(str(self.path)):
                raise
            raise ModelReadError(f"{self.path}: tensor {name!r}: {exc}") from None
        except (KeyError, ValueError, TypeError, IndexError, AttributeError) as exc:
            raise ModelReadError(f"{self.path}: tensor {name!r}: corrupt modelpress encoding "
                                 f"({type(exc).__name__}: {exc})") from None

    # -- writing -------------------------------------------------------------

    def write(self, dst: Path, encoded: EncodedItems,
              progress: Progress | None = None, *,
              metadata: Mapping[str, str] | None = None,
              external_data: str = "auto", target: OnnxTarget | None = None) -> WriteResult:
        """Write the model with each encoded tensor replaced by its decoding nodes.

        `encoded` may be a stream of (name, encoded) pairs in tensor order;
        each tensor's initializers are made (and, with external data, written
        out) as it arrives. `external_data` is "auto" (a data file beside the
        output for a large input, or when the output would pass 2 GB),
        "always" or "never" (see modelpress.formats.onnx.write). `target` chooses the
        form of quantized MatMul/Gemm weights (see OnnxTarget). `metadata`
        entries are added to the model's metadata_props.
        """
        dst = Path(dst)
        target = target or OnnxTarget()
        if target.widen and not widen_allowed(self._tensors):
            target = dataclasses.replace(target, widen=False)
        # A working copy without the weights: each large tensor is a reference to
        # the source's (given back, for the tensors left unencoded, before saving).
        model, sources = borrow(self.model, self._spans.length)
        _check_source(self.path, model)
        notes: list[str] = []
        specs: dict[str, dict[str, Any]] = {}
        tensor_bytes: dict[str, int] = {}
        with staged(dst) as stage:
            data = stage.open_data() if wants_external(external_data,
                                                        self.file_bytes) else None
            locations = locate(model)
            taken = used_names(model)

            def fresh(base: str) -> str:
                name, i = base, 1
                while name in taken:
                    i += 1
                    name = f"{base}_{i}"
                taken.add(name)
                return name

            raised: list[str] = []
            for name, enc in in_store_order(self._tensors, encoded):
                if enc is None:
                    continue
                info = self._tensors[name]
                need = self._opset(model, name, enc, target, locations[name].graph)
                if need > opset_version(model):
                    # Raised before the first tensor that needs it is emitted: nodes
                    # already emitted exist at the current opset, so the converter
                    # can carry them along (it cannot convert a node from an opset
                    # older than its operator).
                    model = _ensure_opset(model, need, self.path, raised)
                    locations = locate(model)
                    taken |= used_names(model)
                opset = opset_version(model)
                if isinstance(enc, LowRank):
                    from modelpress.formats.onnx.lowrank import emit_lowrank, product_note
                    out, form = emit_lowrank(model, name, enc, fresh, info.dtype, opset)
                    if form == "product":
                        notes.append(product_note(name, enc))
                else:
                    site = kernel_site(model, name, enc, info.dtype, target,
                                       locations[name].graph)
                    if site is None:
                        out = emit(name, enc, fresh, info.dtype, opset)
                    else:
                        from modelpress.formats.onnx.quant import emit_kernel
                        out = emit_kernel(name, enc, fresh, site, target, model, opset)
                        if hasattr(enc, "pattern"):
                            out.spec["pattern"] = enc.pattern
                # Each decode chain is one call node and the function it calls, in order.
                calls = [n for n in out.nodes if n.domain == DOMAIN]
                for call, function in zip(calls, out.functions, strict=True):
                    add_function(model, function, call)
                out.spec.update(dtype=int(locations[name].tensor.data_type),
                                shape=list(info.shape), encoding=enc.describe(),
                                origin=locations[name].kind)
                del enc
                tensor_bytes[name] = out.nbytes
                if data is not None:
                    for tensor in out.initializers:
                        data.move(tensor)
                _replace(locations[name], name, out)
                specs[name] = out.spec
            give_back(model, sources)
            place_remaining(model, self.path, data)
            _set_metadata(model, specs, metadata)
            size = save_model(model, dst, stage, self.path, external_data)
        return WriteResult(tensor_bytes=tensor_bytes, file_bytes=size, notes=raised + notes)

    @property
    def has_external_data(self) -> bool:
        """Whether any tensor of the model is stored in an external data file."""
        return any(is_external(loc.tensor) for loc in self._locations.values())

    def _opset(self, model: onnx.ModelProto, name: str, enc: Encoded, target: OnnxTarget,
               home: onnx.GraphProto) -> int:
        """The opset the form chosen for one tensor needs (decided on the source graph)."""
        info = self._tensors[name]
        site = None if isinstance(enc, LowRank) else kernel_site(model, name, enc, info.dtype,
                                                                  target, home)
        if site is not None and site.form == "dequantize-linear":
            return 21
        return required_opset(enc, info.dtype)


def _stored_bytes(tensor: onnx.TensorProto) -> int:
    """Bytes of a tensor's data as stored (INT4 packs two per byte)."""
    if tensor.HasField("raw_data"):
        return len(tensor.raw_data)
    if is_external(tensor):
        # From the header: numpy_helper.to_array would read the data, resolving its
        # location against the current folder rather than the model's.
        info = {entry.key: entry.value for entry in tensor.external_data}
        return int(info["length"]) if "length" in info else data_nbytes(tensor) or 0
    return numpy_helper.to_array(tensor).nbytes


def _load(path: Path) -> tuple[onnx.ModelProto, RawSpans]:
    """The model (its external data not loaded) and where its initializers' raw_data lie."""
    try:
        if is_binary(path):
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


def _read_tensor(model_path: Path, tensor: onnx.TensorProto) -> np.ndarray:
    try:
        if is_external(tensor):
            file, offset, length = external_data_file(model_path, tensor)
            count = -1 if length is None else length
            raw = np.fromfile(file, dtype=np.uint8, count=count, offset=offset)
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


def inline_tensor(model_path: Path, tensor: onnx.TensorProto) -> onnx.TensorProto:
    """A copy of a tensor with its external data read (through our location checks) into
    raw_data. onnx's own helpers would resolve the location against the current folder."""
    if not is_external(tensor):
        return tensor
    file, offset, length = external_data_file(model_path, tensor)
    need = data_nbytes(tensor)
    with open(file, "rb") as fh:
        fh.seek(offset)
        raw = fh.read(need if need is not None else (length if length is not None else -1))
    if need is not None and len(raw) < need:
        raise ModelReadError(f"{model_path}: tensor {tensor.name!r}: external data has {len(raw)} "
                             f"bytes, its dims need {need}")
    inline = onnx.TensorProto()
    inline.CopyFrom(tensor)
    del inline.external_data[:]
    inline.data_location = onnx.TensorProto.DEFAULT
    inline.raw_data = raw
    return inline


def _ensure_opset(model: onnx.ModelProto, need: int, path: Path,
                  notes: list[str]) -> onnx.ModelProto:
    current = opset_version(model)
    if current >= need:
        return model
    from onnx import version_converter
    # The converter serializes the whole model and parses its result: the tensors
    # emitted so far are lent out for it, as the source's weights are (see borrow).
    light, emitted = borrow(model, location=_CONVERTING)
    try:
        converted = version_converter.convert_version(light, need)
    except Exception as exc:
        _refuse_invalid_source(path)
        raise ModelWriteError(
            f"{path}: this encoding needs ONNX opset {need} (the model has {current}) and "
            f"converting the model failed ({str(exc).splitlines()[0]}); use --bits 8 "
            "--granularity channel --scale-bits 0, which needs opset 13") from None
    # The converter may pick the newest IR version; keep the lowest that opset allows.
    converted.ir_version = max(model.ir_version, _MIN_IR.get(need, converted.ir_version))
    # It also adds the shapes it inferred as value_info: they cost bytes, and they let
    # onnxruntime make fusions it does not make on the original (SkipLayerNormalization,
    # measured 8-12% slower on the sample transformer), so the model's own are kept.
    del converted.graph.value_info[:]
    converted.graph.value_info.extend(model.graph.value_info)
    _carry_functions(model, converted, need)
    give_back(converted, emitted, _CONVERTING)
    notes.append(f"ONNX opset raised from {current} to {need} (needed by the encodings used)")
    return converted


_MIN_IR = {13: 7, 19: 9, 21: 10}
# Where tensors lent out for the version converter point (see onnx_borrow).
_CONVERTING = "<modelpress tensor lent for opset conversion>"


def _carry_functions(model: onnx.ModelProto, converted: onnx.ModelProto, opset: int) -> None:
    """Put back the model-local functions the version converter drops.

    A function must import the model's opset; the decode chains' operators
    (Cast, Reshape, Mul, bit operations...) mean the same at the new opset.
    """
    if converted.functions or not model.functions:
        return
    for function in model.functions:
        carried = converted.functions.add()
        carried.CopyFrom(function)
        for entry in carried.opset_import:
            if entry.domain in ("", "ai.onnx"):
                entry.version = opset


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
        entry.value = encode_doc({"format_version": FORMAT_VERSION, "tensors": specs})
    for key, value in (extra or {}).items():
        model.metadata_props.add(key=key, value=value)


def check_saved(path: Path, dst: Path, source: Path | None = None) -> None:
    """Run onnx.checker's full check on a saved output (path form: external data is
    checked where it lies); raise ModelWriteError naming `dst` if it fails.

    When the check fails and the `source` model fails it too, the error names
    the source: the input is broken, not what modelpress made of it. With its
    weights in external data the proto the checker loads is small, so the
    check costs little memory whatever the model's size.
    """
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        if source is not None:
            _refuse_invalid_source(source)
        raise ModelWriteError(f"{dst}: the compressed model fails onnx.checker "
                              f"({_one_line(exc)}); nothing was written") from None


def _check_source(path: Path, model: onnx.ModelProto) -> None:
    """Refuse an input that fails onnx.checker's structural check before any work on it.

    Writing it would fail the output check anyway, unless a rewrite happened to
    drop the invalid node: then modelpress would make an output that cannot be
    decompressed back into a valid model. A model with external data is
    checked through its path, so locations resolve against its folder (the
    weights are not loaded); any other in memory, with the tensors a `borrow`
    copy borrows standing in empty (see `checkable`).
    """
    external = any(is_external(loc.tensor) and not is_borrowed(loc.tensor)
                   for loc in locate(model).values())
    try:
        onnx.checker.check_model(str(path) if external else checkable(model))
    except Exception as exc:
        raise ModelReadError(f"{path}: the model fails onnx.checker ({_one_line(exc)}); "
                             "modelpress writes only valid models, so fix the input first") from None


def _refuse_invalid_source(path: Path) -> None:
    """Raise ModelReadError if the input model itself fails onnx.checker (full check)."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise ModelReadError(f"{path}: the model fails onnx.checker ({_one_line(exc)}); "
                             "modelpress writes only valid models, so fix the input first") from None


def _one_line(exc: BaseException, limit: int = 300) -> str:
    """An exception's message with its line breaks folded (checker messages span lines)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _read_encodings(path: Path, model: onnx.ModelProto,
                    tensors: set[str]) -> dict[str, dict[str, Any]]:
    raw = next((p.value for p in model.metadata_props if p.key == METADATA_KEY), None)
    if raw is None:
        return {}
    try:
        doc = decode_doc(raw)
        if doc.get("format_version", 0) > FORMAT_VERSION:
            raise ModelReadError(f"{path}: written by a newer modelpress; upgrade modelpress")
        specs = dict(doc["tensors"])
        for name, spec in specs.items():
            _check_spec(name, spec, tensors)
        return specs
    except ModelReadError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelReadError(f"{path}: corrupt modelpress metadata ({exc})") from None


def _check_spec(name: str, spec: Any, tensors: set[str]) -> None:
    """Raise ValueError unless a tensor's spec has the fields readers rely on."""
    if not isinstance(spec, dict) or not isinstance(spec.get("layout"), str):
        raise ValueError(f"tensor {name!r} has no layout")
    onnx.helper.tensor_dtype_to_np_dtype(spec["dtype"])
    shape = spec["shape"]
    if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise ValueError(f"tensor {name!r} has an invalid shape {shape!r}")
    parts = _spec_parts(spec) or [name]  # no parts: stored densely under its own name
    missing = [p for p in parts if not isinstance(p, str) or p not in tensors]
    nodes = spec_nodes(spec) if isinstance(spec.get("nodes", []), list) else [None]
    if missing or not all(isinstance(n, str) for n in nodes):
        raise ValueError(f"tensor {name!r} lacks {missing or 'its node list'}")


def _spec_parts(spec: Any) -> list[Any]:
    """Initializer names a spec refers to, in nested specs too."""
    if not isinstance(spec, dict):
        return []
    inits = spec.get("initializers", {})
    found = list(inits.values()) if isinstance(inits, dict) else [inits]
    for key, value in spec.items():
        if key != "initializers" and isinstance(value, dict):
            found += _spec_parts(value)
    return found
