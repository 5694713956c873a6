"""Input shapes of an ONNX graph: its inputs, and sizes for their symbolic dims.

Random evaluation inputs need a size for every symbolic dim: the graph fixes
some (an LSTM's initial state follows its sequence input), common names give
others (batch, height, width), and --dim NAME=N the rest.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import onnx

from modelpress.core.errors import InputDataError

DEFAULT_BATCH = 1
DEFAULT_DIM = 16

Feeds = dict[str, np.ndarray]

@dataclass(frozen=True)
class InputSpec:
    """One graph input: name, numpy dtype and dims (int, symbolic name, or None)."""

    name: str
    dtype: np.dtype
    dims: tuple[int | str | None, ...]


def input_specs(model: onnx.ModelProto) -> list[InputSpec]:
    """The inputs a caller must feed (initializers listed as inputs are left out)."""
    inits = {t.name for t in model.graph.initializer}
    specs = []
    for value in model.graph.input:
        if value.name in inits:
            continue
        tensor = value.type.tensor_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.elem_type))
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                     for d in tensor.shape.dim)
        specs.append(InputSpec(value.name, dtype, dims))
    return specs




# Symbolic height and width of an image input: a multiple of 32 and 64, the strides at
# which detection and segmentation networks downsample and then upsample back.
DEFAULT_SPATIAL = 64
_SPATIAL_NAMES = ("height", "width")
# Short names of a batch axis besides any name containing "batch".
_BATCH_NAMES = ("n", "b", "bs")
# Recurrent ops and the input positions of their initial states ([directions, batch, hidden]).
_STATE_INPUTS = {"LSTM": (5, 6), "GRU": (5,), "RNN": (5,)}


Axis = tuple[str, int]   # (input name, axis)


def graph_dims(model: onnx.ModelProto) -> dict[Axis, int | Axis]:
    """Sizes the graph fixes for symbolic input dims: a size, or the input axis it equals.

    A graph input that is the initial state of an LSTM, GRU or RNN must be
    [num_directions, batch, hidden_size] (or [batch, num_directions,
    hidden_size] with layout=1): the node's attributes give the directions
    and the hidden size, and its batch is the batch of the sequence input X.
    """
    inputs = {spec.name for spec in input_specs(model)}
    fixed: dict[Axis, int | Axis] = {}
    for node in model.graph.node:
        for index in _STATE_INPUTS.get(node.op_type, ()):
            if index >= len(node.input) or node.input[index] not in inputs:
                continue
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            hidden = int(attrs.get("hidden_size", 0))
            direction = attrs.get("direction", b"forward")
            directions = 2 if direction in (b"bidirectional", "bidirectional") else 1
            name = node.input[index]
            batch_first = int(attrs.get("layout", 0)) == 1
            fixed[(name, 1 if batch_first else 0)] = directions
            if hidden > 0:
                fixed[(name, 2)] = hidden
            if node.input[0] in inputs:
                fixed[(name, 0 if batch_first else 1)] = (node.input[0], 0 if batch_first else 1)
    return fixed


def resolve_dims(specs: list[InputSpec], dims: Mapping[str, int],
                 fixed: Mapping[Axis, int | Axis] | None = None) -> dict[str, tuple[int, ...]]:
    """Concrete input shapes for symbolic dims, first rule that applies:

    --dim values by name; sizes the graph fixes (`graph_dims`), which also
    set every other dim of the same name; 1 for a name containing "batch"
    (or an unnamed first axis); 64 for height/width (a name containing
    them, or the last two axes of a 4-D float input); else 16.
    """
    links = {key: value for key, value in (fixed or {}).items() if isinstance(value, tuple)}
    fixed = {key: value for key, value in (fixed or {}).items() if isinstance(value, int)}
    by_name = {spec.dims[axis]: size for (name, axis), size in fixed.items()
               for spec in specs if spec.name == name and axis < len(spec.dims)
               and isinstance(spec.dims[axis], str)}
    known = {d for s in specs for d in s.dims if isinstance(d, str)}
    for name in dims:
        if name not in known:
            listed = ", ".join(sorted(known)) or "none"
            raise InputDataError(f"--dim {name}: the model has no dimension named {name!r} "
                                 f"(its symbolic dimensions: {listed})")
    shapes = {}
    for spec in specs:
        shape = []
        for axis, dim in enumerate(spec.dims):
            if isinstance(dim, int) and dim > 0:
                shape.append(dim)
            elif isinstance(dim, str) and dim in dims:
                shape.append(dims[dim])
            elif (spec.name, axis) in fixed:
                shape.append(fixed[(spec.name, axis)])
            elif isinstance(dim, str) and dim in by_name:
                shape.append(by_name[dim])
            elif (dim is None and axis == 0) or (isinstance(dim, str) and (
                    "batch" in dim.lower() or dim.lower() in _BATCH_NAMES)):
                shape.append(DEFAULT_BATCH)
            elif (isinstance(dim, str) and any(n in dim.lower() for n in _SPATIAL_NAMES)) or (
                    len(spec.dims) == 4 and axis >= 2 and spec.dtype.kind == "f"):
                shape.append(DEFAULT_SPATIAL)
            else:
                shape.append(DEFAULT_DIM)
        shapes[spec.name] = tuple(shape)
    for (name, axis), (other, other_axis) in links.items():
        dim = next(s.dims[axis] for s in specs if s.name == name)
        if name in shapes and other in shapes and not isinstance(dim, int) and dim not in dims:
            shape = list(shapes[name])
            shape[axis] = shapes[other][other_axis]
            shapes[name] = tuple(shape)
    return shapes


def made_up_hint(model: onnx.ModelProto, feeds: Feeds, dims: Mapping[str, int]) -> str:
    """How to fix a run that failed on made-up inputs: which dims were guessed, and the options."""
    guessed = []
    fixed = graph_dims(model)
    for spec in input_specs(model):
        shape = feeds[spec.name].shape if spec.name in feeds else ()
        made = [f"{d or f'dim {axis}'}={shape[axis]}" for axis, d in enumerate(spec.dims)
                if not (isinstance(d, int) and d > 0) and d not in dims and axis < len(shape)
                and (spec.name, axis) not in fixed]
        if made:
            guessed.append(f"input {spec.name!r} {list(shape)} ({', '.join(made)} made up)")
    where = "; ".join(guessed) if guessed else "the inputs were made up (random values)"
    return (f"{where}: give the real sizes with --dim NAME=N, or real inputs with "
            "--inputs FILE.npz")
