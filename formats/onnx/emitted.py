"""What an emitter makes of one encoded tensor: initializers, nodes, functions, a spec."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import onnx
from onnx import numpy_helper

FreshName = Callable[[str], str]


@dataclass
class Emitted:
    """What replaces one tensor: initializers, nodes (ending in the tensor's name), a spec."""

    initializers: list[onnx.TensorProto] = field(default_factory=list)
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    spec: dict[str, Any] = field(default_factory=dict)
    opset: int = 1
    functions: list[onnx.FunctionProto] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(data_bytes(t) for t in self.initializers)


def data_bytes(tensor: onnx.TensorProto) -> int:
    """Bytes of an emitted initializer's data."""
    if tensor.HasField("raw_data"):
        return len(tensor.raw_data)
    return numpy_helper.to_array(tensor).nbytes
