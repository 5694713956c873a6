"""ONNX models: initializers and Constant tensors read one at a time; compressed writes."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import onnx

from modelpress.core.encoded import Dense, Encoded, LowRank
from modelpress.core.errors import InputDataError, ModelReadError
from modelpress.core.store import (EncodedItems, Progress, WriteOptions, WriteResult, in_store_order,
                                   options_for)
from modelpress.core.pipeline import DEFAULT_MIN_ELEMENTS
from modelpress.core.tensorinfo import TensorInfo, with_mean_weight_size

from modelpress.formats.onnx.borrow import borrow, give_back
from modelpress.formats.onnx.calibrate import input_stats
from modelpress.formats.onnx.probe import probed_stats
from modelpress.formats.onnx.sequential import Rounder, in_order
from modelpress.formats.onnx.chain import DOMAIN, add_function
from modelpress.formats.onnx.check import check_source
from modelpress.formats.onnx.emit import decode_spec, emit, required_opset
from modelpress.formats.onnx.graph import (Location, check_tensor, external_data_file, fresh_name,
                                           is_external, locate, opset_version, other_uses,
                                           tensor_info, used_names, weight_roles)
from modelpress.formats.onnx.lowrank import emit_lowrank, product_note
from modelpress.formats.onnx.meta import read_encodings, set_metadata, spec_initializers
from modelpress.formats.onnx.opset import ensure_opset
from modelpress.formats.onnx.options import OnnxWriteOptions
from modelpress.formats.onnx.quant import emit_kernel
from modelpress.formats.onnx.sites import OnnxTarget, kernel_site, sensitive_tensors, widen_allowed
from modelpress.formats.location import AnyPath, ObjectPath, file_size
from modelpress.formats.onnx.tensors import (inline_tensor, load_model, model_source, read_tensor,
                                             stored_bytes)
from modelpress.formats.onnx.wire import map_tensor, mappable
from modelpress.formats.onnx.write import place_remaining, save_model, staged, wants_external
from modelpress.formats.tree_check import check_tree


class OnnxStore:
    """An .onnx model opened for reading (external data is read per tensor, on demand),
    from a local file or from storage."""

    format = "onnx"
    sharded = False  # one file (a ShardedStore is the index and its shards)

    def __init__(self, path: AnyPath | str) -> None:
        self.source = model_source(path if isinstance(path, ObjectPath) else Path(path))
        self.path: AnyPath = self.source.path
        self.model, self._spans = load_model(self.source)
        self._locations = locate(self.model)
        for name, loc in self._locations.items():
            check_tensor(self.path, loc.tensor, name, self._spans.length(loc.tensor))
        roles = weight_roles(self.model)
        sizes = {name: int(np.prod(loc.tensor.dims, dtype=np.int64))
                 for name, loc in self._locations.items()}
        sensitive, share = sensitive_tensors(self.model, roles, sizes)
        uses = other_uses(self.model, roles)
        self._tensors = with_mean_weight_size(
            {name: tensor_info(name, loc.tensor, roles.get(name), sensitive.get(name), share,
                               uses.get(name))
             for name, loc in self._locations.items()}, DEFAULT_MIN_ELEMENTS)
        self.encodings = read_encodings(self.path, self.model, set(self._locations))

    @property
    def tensors(self) -> Mapping[str, TensorInfo]:
        return self._tensors

    def calibrate(self, calibration: Path, selected: set[str]) -> list[str]:
        """Attach input statistics from `calibration` (an .npz of model inputs) to the
        MatMul/Gemm/Conv weights among `selected` (those the recipe quantizes), and the
        output-side moments `probe` measures to those layers and Gather tables it takes;
        notes for the report. Without such weights the model is not run."""
        weights = {name: info.shape for name, info in self._tensors.items()
                   if name in selected and info.role in ("MatMul", "Gemm", "Conv")}
        if not weights:
            return [f"--calibration {calibration}: not used (the recipe quantizes no MatMul, "
                    "Gemm or Conv weight)"]
        if isinstance(self.path, ObjectPath):
            raise InputDataError(f"--calibration {calibration}: runs the model in onnxruntime, "
                                 f"which reads local files only; copy {self.path} here first")
        stats, notes = input_stats(self.path, self.model, Path(calibration), weights)
        tables = {name: info.shape for name, info in self._tensors.items()
                  if name in selected and info.role == "Gather"}
        sizes = {name: info.size for name, info in self._tensors.items()}
        stats, probed = probed_stats(self.path, self.model, Path(calibration), stats, tables,
                                     sizes)
        for name, found in stats.items():
            self._tensors[name] = dataclasses.replace(self._tensors[name], input_stats=found)
        notes.extend(probed)
        return notes

    def calibrate_in_order(self, calibration: Path, changed: list[str], ordered: set[str],
                           round_tensors: Rounder) -> list[str]:
        """After `calibrate`: the layers among `ordered` get the statistics of sequential
        calibration (modelpress.formats.onnx.sequential), from the model as `round_tensors`
        rounds `changed` (every tensor the run changes) in order; notes for the report."""
        return in_order(self.path, self.model, calibration, self._tensors, changed, ordered,
                        round_tensors)

    @property
    def data_files(self) -> set[AnyPath]:
        """The external data files the model's tensors live in."""
        return {external_data_file(self.path, loc.tensor)[0]
                for loc in self._locations.values() if is_external(loc.tensor)}

    @property
    def file_bytes(self) -> int:
        return self.source.size + sum(file_size(f) for f in self.data_files)

    def read(self, name: str) -> np.ndarray:
        """One tensor's values (read-only)."""
        tensor = self._locations[name].tensor
        span = self._spans.span(tensor)
        if span is not None and mappable(tensor):
            try:  # straight from the page cache (or the model read into memory): no copy
                return map_tensor(self.source, tensor, span[0])
            except (OSError, ValueError) as exc:
                raise ModelReadError(f"{self.path}: cannot read tensor {tensor.name!r}: "
                                     f"{exc}") from None
        return read_tensor(self.path, tensor)

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
            stored = sum(stored_bytes(self._locations[p].tensor) for p in spec_initializers(spec)
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
              options: WriteOptions | None = None) -> WriteResult:
        """Write the model with each encoded tensor replaced by its decoding nodes.

        `encoded` may be a stream of (name, encoded) pairs in tensor order;
        each tensor's initializers are made (and, with external data, written
        out) as it arrives. `options` (an OnnxWriteOptions) say where the
        weights go (`external_data`: "auto" writes a data file beside the output
        for a large input, or when the output would pass 2 GB; see
        modelpress.formats.onnx.write) and the form of quantized MatMul/Gemm
        weights (`target`, see OnnxTarget). `metadata` entries are added to
        the model's metadata_props.
        """
        dst = Path(dst)
        options = _onnx_options(options)
        external_data, target = options.external_data, options.target
        if target.widen and not widen_allowed(self._tensors):
            target = dataclasses.replace(target, widen=False)
        # A working copy without the weights: each large tensor is a reference to
        # the source's (given back, for the tensors left unencoded, before saving).
        model, sources = borrow(self.model, self._spans.length)
        check_source(self.path, model)
        notes: list[str] = []
        specs: dict[str, dict[str, Any]] = {}
        tensor_bytes: dict[str, int] = {}
        with staged(dst) as stage:
            data = stage.open_data() if wants_external(external_data,
                                                        self.file_bytes) else None
            locations = locate(model)
            taken = used_names(model)

            def fresh(base: str) -> str:
                return fresh_name(taken, base)

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
                    model = ensure_opset(model, need, self.path, raised)
                    locations = locate(model)
                    taken |= used_names(model)
                opset = opset_version(model)
                if isinstance(enc, LowRank):
                    out, form = emit_lowrank(model, name, enc, fresh, info.dtype, opset)
                    if form == "product":
                        notes.append(product_note(name, enc))
                else:
                    site = kernel_site(model, name, enc, info.dtype, target,
                                       locations[name].graph)
                    if site is None:
                        out = emit(name, enc, fresh, info.dtype, opset)
                    else:
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
            set_metadata(model, specs, metadata)
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


def _onnx_options(options: WriteOptions | None) -> OnnxWriteOptions:
    """The writer settings for an ONNX output (None: the defaults)."""
    return options_for(OnnxWriteOptions, options, "an ONNX model is")


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
