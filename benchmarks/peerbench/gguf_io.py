"""llama.cpp's quantizers through gguf-py (numpy Q8_0/Q4_0): quantize weights, write GGUF, read back.

GGUF quantizes rows along the reduction axis in blocks of 32. Each weight is laid out as a 2-D
[rows, cols] matrix with the reduction axis last (an ONNX MatMul weight [K, N] is transposed; a
Conv kernel [O, I, kh, kw] and a safetensors tensor [out, ...] are flattened to [out, rest]); rows
whose length is not a multiple of 32 are padded with zeros (llama.cpp itself would fall back to
another type for such tensors: padding keeps every weight in the format, and the padding bytes are
counted). The layout of each tensor is kept in the GGUF metadata so that it can be read back into
the original shape. Tensors left alone (biases, norms) are written as F32 so that the file holds
all the floating-point weights, not the graph.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

LAYOUT_KEY = "modelpress_bench.layout"
BLOCK = 32


def onnx_reduction_axes(model) -> dict[str, int]:
    """Initializer name -> axis its consumer reduces over (-1: flatten all but the first axis),
    for the weight of every MatMul/Gemm/Conv/ConvTranspose/Gather held directly by an
    initializer or through one Transpose."""
    from onnx import numpy_helper  # noqa: F401  (keeps the import cost here)

    from .weights import GraphIndex, attr, weight_consumers, WEIGHT_INPUT

    index = GraphIndex(model)
    consumers = weight_consumers(model)
    axes: dict[str, int] = {}
    for node in model.graph.node:
        if not node.output or node.output[0] not in consumers:
            continue
        name = node.input[WEIGHT_INPUT[node.op_type]]
        if node.op_type == "MatMul":
            axis = 0
        elif node.op_type == "Gemm":
            axis = 1 if attr(node, "transB", 0) else 0
        elif node.op_type == "Gather":
            axis = 1
        else:
            axis = -1
        producer = index.producer.get(name)
        if name not in index.initializers and producer is not None and producer.op_type == "Transpose" \
                and producer.input[0] in index.initializers and axis >= 0:
            perm = attr(producer, "perm", None) or [1, 0]
            name, axis = producer.input[0], perm[axis]
        if name in index.initializers:
            axes.setdefault(name, axis)
    return axes


def to_rows(w: np.ndarray, axis: int) -> np.ndarray:
    """The weight as [rows, cols] with the reduction axis last, cols padded to a multiple of 32."""
    if axis < 0 or w.ndim != 2:
        m = w.reshape(w.shape[0], -1)
    else:
        m = w.T if axis == 0 else w
    cols = m.shape[1]
    padded = -(-cols // BLOCK) * BLOCK
    if padded != cols:
        m = np.pad(m, ((0, 0), (0, padded - cols)))
    return np.ascontiguousarray(m, dtype=np.float32)


def from_rows(m: np.ndarray, shape: tuple[int, ...], axis: int) -> np.ndarray:
    """Inverse of `to_rows`."""
    if axis < 0 or len(shape) != 2:
        return m[:, :int(np.prod(shape[1:]))].reshape(shape)
    if axis == 0:
        return np.ascontiguousarray(m[:, :shape[0]].T)
    return np.ascontiguousarray(m[:, :shape[1]])


def write_gguf(dst: str | Path, tensors: dict[str, tuple[np.ndarray, int | None]], qtype: str) -> None:
    """Write a GGUF file: each (array, axis) with axis not None quantized to `qtype` along that
    reduction axis, arrays with axis None stored as F32."""
    from gguf import GGMLQuantizationType, GGUFWriter, quants

    qt = getattr(GGMLQuantizationType, qtype)
    writer = GGUFWriter(str(dst), arch="onnx")
    layout = {}
    for i, (name, (array, axis)) in enumerate(tensors.items()):
        key = f"w{i}"
        if axis is None:
            writer.add_tensor(key, np.ascontiguousarray(array, dtype=np.float32))
            layout[key] = {"source": name, "shape": list(array.shape), "axis": None}
            continue
        rows = to_rows(np.asarray(array, np.float32), axis)
        writer.add_tensor(key, quants.quantize(rows, qt), raw_dtype=qt)
        layout[key] = {"source": name, "shape": list(array.shape), "axis": axis}
    writer.add_string(LAYOUT_KEY, json.dumps(layout))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def read_gguf(path: str | Path) -> dict[str, tuple[np.ndarray, int, bool]]:
    """Source name -> (float32 array in its original shape, payload bytes, quantized?)."""
    from gguf import GGUFReader, quants

    reader = GGUFReader(str(path))
    field = reader.fields[LAYOUT_KEY]
    layout = json.loads(bytes(field.parts[field.data[0]]).decode("utf-8"))
    out = {}
    for t in reader.tensors:
        spec = layout[t.name]
        shape = tuple(spec["shape"])
        if spec["axis"] is None:
            out[spec["source"]] = (np.asarray(t.data, np.float32).reshape(shape), int(t.n_bytes), False)
            continue
        rows = quants.dequantize(np.asarray(t.data), t.tensor_type)
        rows = rows.reshape(-1, rows.shape[-1])
        out[spec["source"]] = (from_rows(rows, shape, spec["axis"]).astype(np.float32),
                               int(t.n_bytes), True)
    return out


def quantize_onnx(src: str | Path, dst: str | Path, qtype: str) -> None:
    """gguf `qtype` on every weight-like initializer of an ONNX model; other float
    initializers as F32 (the graph is not written: GGUF holds tensors)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src))
    axes = onnx_reduction_axes(model)
    tensors = {}
    for t in model.graph.initializer:
        a = numpy_helper.to_array(t)
        if a.dtype.kind == "f":
            tensors[t.name] = (a, axes.get(t.name))
    write_gguf(dst, tensors, qtype)


def quantize_safetensors(src: str | Path, dst: str | Path, qtype: str) -> None:
    """gguf `qtype` on every floating-point tensor of rank >= 2 of a safetensors file
    (reduction over all axes but the first), others as F32."""
    from safetensors import safe_open

    tensors = {}
    with safe_open(str(src), framework="np") as f:
        for name in f.keys():
            a = f.get_tensor(name)
            if a.dtype.kind == "f":
                tensors[name] = (a, -1 if a.ndim >= 2 else None)
    write_gguf(dst, tensors, qtype)
