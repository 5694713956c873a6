"""Activations quantized and dequantized in place (QuantizeLinear -> DequantizeLinear), to
measure what int8 activation ranges do to a model's outputs before writing a QDQ model.

`fake_quant` inserts the pair after each named tensor with fixed ranges; weights stay as
they are. `FakeQuantRunner` holds one onnxruntime session of the model where every pair's
scale, zero point and an on/off switch are graph inputs, so that trying another range for
a tensor, or keeping it in float, costs one run and no new session (`range_choice`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from modelpress.core.activation_ranges import ActivationRange
from modelpress.core.metrics import compare
from modelpress.formats.onnx.calibration_run import chunks, run_exposed
from modelpress.formats.onnx.sessions import expose, model_session
from modelpress.formats.onnx.graph import fresh_name, opset_version, used_names
from modelpress.formats.onnx.run import signals

MIN_OPSET = 10  # QuantizeLinear / DequantizeLinear, per-tensor


def fake_quant(model: onnx.ModelProto, ranges: Mapping[str, ActivationRange]) -> onnx.ModelProto:
    """A copy of `model` whose main-graph consumers of each tensor in `ranges` (graph inputs
    or node outputs) read it through QuantizeLinear -> DequantizeLinear with that range;
    graph outputs keep the float values."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    _check_opset(out)
    used = used_names(out)
    inserted: dict[str, list[onnx.NodeProto]] = {}
    for name, grid in ranges.items():
        scale = fresh_name(used, f"{name}/act_scale")
        zero = fresh_name(used, f"{name}/act_zero_point")
        out.graph.initializer.append(numpy_helper.from_array(np.array(grid.scale, np.float32),
                                                             scale))
        out.graph.initializer.append(numpy_helper.from_array(
            np.array(grid.zero_point, np.int8 if grid.signed else np.uint8), zero))
        inserted[name] = _pair(used, name, scale, zero)
    _splice(out.graph, inserted)
    return out


def _pair(used: set[str], name: str, scale: str, zero: str) -> list[onnx.NodeProto]:
    quantized, restored = fresh_name(used, f"{name}/act_q"), fresh_name(used, f"{name}/act_dq")
    return [helper.make_node("QuantizeLinear", [name, scale, zero], [quantized],
                             name=fresh_name(used, f"{name}/QuantizeLinear")),
            helper.make_node("DequantizeLinear", [quantized, scale, zero], [restored],
                             name=fresh_name(used, f"{name}/DequantizeLinear"))]


def _splice(graph: onnx.GraphProto, inserted: dict[str, list[onnx.NodeProto]]) -> None:
    """Put each tensor's new nodes right after its producer (first for graph inputs and
    initializers) and point the other nodes' inputs at the last new node's output."""
    replacement = {name: nodes[-1].output[0] for name, nodes in inserted.items()}
    own = {id(n) for nodes in inserted.values() for n in nodes}
    produced = {out for node in graph.node for out in node.output}
    order: list[onnx.NodeProto] = [n for name, nodes in inserted.items()
                                   if name not in produced for n in nodes]
    for node in graph.node:
        order.append(node)
        for out in node.output:
            order.extend(inserted.get(out, ()))
    for node in order:
        if id(node) in own:
            continue
        for i, name in enumerate(node.input):
            if name in replacement:
                node.input[i] = replacement[name]
    del graph.node[:]
    graph.node.extend(order)


def _check_opset(model: onnx.ModelProto) -> None:
    version = opset_version(model)
    if version < MIN_OPSET:
        raise ValueError(f"the model imports ONNX opset {version}; QuantizeLinear needs "
                         f"{MIN_OPSET} or later (convert it with onnx.version_converter)")


class FakeQuantRunner:
    """The model at `path` (graph `model`) with a switchable QuantizeLinear -> DequantizeLinear
    pair after each of `names`, run on `feeds` (a few samples at a time); `outputs(ranges)`
    gives its float outputs with the tensors in `ranges` quantized and the others in float,
    and the `signals` (output name -> the logits before a final softmax, or the output
    itself: `run.signals`), which tell changes apart better than probabilities near 0 or 1.
    Zero points are int8 when `signed`, else uint8."""

    def __init__(self, path: Path, model: onnx.ModelProto, names: list[str],
                 feeds: Mapping[str, np.ndarray], signed: bool = False,
                 calibration: Path | None = None) -> None:
        self.path, self.names, self.signed = Path(path), list(names), signed
        self.feeds = dict(feeds)
        self._source = calibration or self.path
        self._signature = onnx.ModelProto()  # the inputs, for `chunks`
        self._signature.graph.input.extend(model.graph.input)
        variant = onnx.ModelProto()
        variant.CopyFrom(model)
        _check_opset(variant)
        used = used_names(variant)
        self._inputs: dict[str, tuple[str, str, str]] = {}
        inserted = {}
        zero_type = TensorProto.INT8 if signed else TensorProto.UINT8
        for name in self.names:
            scale = fresh_name(used, f"{name}/act_scale")
            zero = fresh_name(used, f"{name}/act_zero_point")
            switch = fresh_name(used, f"{name}/act_on")
            variant.graph.input.extend([
                helper.make_tensor_value_info(scale, TensorProto.FLOAT, []),
                helper.make_tensor_value_info(zero, zero_type, []),
                helper.make_tensor_value_info(switch, TensorProto.BOOL, [])])
            nodes = _pair(used, name, scale, zero)
            chosen = fresh_name(used, f"{name}/act_chosen")
            nodes.append(helper.make_node("Where", [switch, nodes[-1].output[0], name], [chosen],
                                          name=fresh_name(used, f"{name}/act_switch")))
            inserted[name] = nodes
            self._inputs[name] = (scale, zero, switch)
        _splice(variant.graph, inserted)
        self.signals = signals(model)
        expose(variant, self.signals.values())
        self.output_names = [o.name for o in variant.graph.output]
        self._session = model_session(variant, self.path)
        self.runs = 0

    def outputs(self, ranges: Mapping[str, ActivationRange | None]) -> dict[str, np.ndarray]:
        """Every graph output and signal with the tensors of `ranges` quantized (None: float)."""
        fixed = {}
        for name in self.names:
            scale, zero, switch = self._inputs[name]
            grid = ranges.get(name)
            if grid is not None and grid.signed != self.signed:
                raise ValueError(f"range of {name!r} is {'int8' if grid.signed else 'uint8'}; "
                                 f"this runner takes {'int8' if self.signed else 'uint8'}")
            fixed[scale] = np.array(grid.scale if grid else 1.0, np.float32)
            fixed[zero] = np.array(grid.zero_point if grid else 0,
                                   np.int8 if self.signed else np.uint8)
            fixed[switch] = np.array(grid is not None)
        self.runs += 1
        parts, sizes = [], []
        for chunk in chunks(self.feeds, self._source, self._signature):
            parts.append(run_exposed(self._session, self.output_names, {**chunk, **fixed},
                                     self.path, self._source))
            sizes.append(next(iter(chunk.values())).shape[0] if chunk else 0)
        if len(parts) > 1 and not all(v.ndim and v.shape[0] == n
                                      for part, n in zip(parts, sizes) for v in part):
            # some output does not follow the samples (a reduction): run them all at once
            parts = [run_exposed(self._session, self.output_names, {**self.feeds, **fixed},
                                 self.path, self._source)]
        if len(parts) == 1:
            return dict(zip(self.output_names, parts[0]))
        return {name: np.concatenate([p[i] for p in parts])
                for i, name in enumerate(self.output_names)}


def worst_error(reference: Mapping[str, np.ndarray], outputs: Mapping[str, np.ndarray],
                names: list[str] | None = None) -> float:
    """The worst relative L2 error among float `names` (default: all of `reference`)."""
    names = list(reference) if names is None else names
    return max((compare(reference[n], outputs[n]).rel_l2 for n in names
                if np.asarray(reference[n]).dtype.kind == "f"), default=0.0)
