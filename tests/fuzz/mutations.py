"""Mutations the fuzzer applies to packed inputs (a format byte, then the file's bytes).

Structure-aware edits for each format (safetensors header JSON and length
field; ONNX tensors, dims, data types, external data locations, nodes,
opsets, metadata) and raw byte edits (bit flips, overwritten and inserted
bytes, truncation, splices of two inputs). All take a seeded random.Random.
"""

from __future__ import annotations

import json
import random

import onnx
from onnx import TensorProto, helper

from harness import SIDE_FILE, pack, unpack

_ODD_VALUES = [None, True, -1, 0, 1, 2, 3, 7, 8, 255, 2**31, 2**40, 2**63, -2**63, 1.5, float("nan"),
               "", "x", "F32", "I64", "BF16", "group", "channel", "tensor", [], [0], [1, 1], {}]


def _json_mutate(value, rng: random.Random, depth: int = 0):
    """Replace, delete or add one thing somewhere in a JSON value."""
    if isinstance(value, dict) and value and depth < 8:
        key = rng.choice(list(value))
        roll = rng.random()
        if roll < 0.15:
            value.pop(key)
        elif roll < 0.25:
            value[key + rng.choice(["_", ".weight", "x"])] = value[key]
        else:
            value[key] = _json_mutate(value[key], rng, depth + 1)
        return value
    if isinstance(value, list) and value and depth < 8 and rng.random() < 0.7:
        i = rng.randrange(len(value))
        roll = rng.random()
        if roll < 0.15:
            value.pop(i)
        elif roll < 0.3:
            value.append(rng.choice(value))
        else:
            value[i] = _json_mutate(value[i], rng, depth + 1)
        return value
    if isinstance(value, str) and value.startswith("{") and rng.random() < 0.8:
        try:  # JSON inside a string: modelpress metadata
            return json.dumps(_json_mutate(json.loads(value), rng, depth + 1))
        except ValueError:
            pass
    if isinstance(value, int) and not isinstance(value, bool) and rng.random() < 0.5:
        return value + rng.choice([-1, 1, -8, 8, 4096, -value, value])
    return rng.choice(_ODD_VALUES)


def mutate_safetensors(body: bytes, rng: random.Random) -> bytes:
    """Edit the header: its JSON (dtypes, shapes, offsets, metadata) or its length field."""
    if len(body) < 8:
        return body
    length = int.from_bytes(body[:8], "little")
    if rng.random() < 0.15 or length > len(body) - 8:
        new = rng.choice([length + rng.randint(-16, 16), rng.getrandbits(64), 0, len(body)])
        return max(0, min(new, 2**64 - 1)).to_bytes(8, "little") + body[8:]
    try:
        header = json.loads(body[8:8 + length])
    except ValueError:
        return body
    for _ in range(rng.randint(1, 3)):
        header = _json_mutate(header, rng)
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + body[8 + length:]


_OPS = ["MatMul", "Gemm", "Conv", "ConvTranspose", "Gather", "Add", "DequantizeLinear", "Constant",
        "Cast", "Reshape"]
_LOCATIONS = [SIDE_FILE, "../" + SIDE_FILE, "/etc/hostname", "missing.bin", "", "model.onnx",
              "./" + SIDE_FILE, "sub/../" + SIDE_FILE]


def _mutate_tensor(t: onnx.TensorProto, rng: random.Random) -> None:
    roll = rng.randrange(6)
    if roll == 0 and t.dims:
        t.dims[rng.randrange(len(t.dims))] = rng.choice([0, 1, 3, 64, -1, 2**31, 2**62])
    elif roll == 1:
        t.data_type = rng.choice([0, 1, 2, 3, 6, 7, 9, 10, 16, 17, 21, 22, 8, 99])
    elif roll == 2:
        t.raw_data = t.raw_data[: rng.randint(0, len(t.raw_data))]
    elif roll == 3:
        t.raw_data = t.raw_data + bytes(rng.randint(1, 64))
    elif roll == 4:
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        del t.external_data[:]
        for key, value in (("location", rng.choice(_LOCATIONS)),
                           ("offset", str(rng.choice([0, 4, -4, 16384, 2**40]))),
                           ("length", str(rng.choice([0, 64, 16384, 2**40])))):
            if rng.random() < 0.8:
                entry = t.external_data.add()
                entry.key, entry.value = key, value
    else:
        t.dims.append(rng.choice([1, 2, 0]))


def mutate_onnx(body: bytes, rng: random.Random) -> bytes:
    """Edit the model: tensors, nodes, opset, modelpress metadata."""
    try:
        model = onnx.load_from_string(body)
    except Exception:
        return body
    graph = model.graph
    roll = rng.randrange(7)
    if roll == 0 and graph.initializer:
        _mutate_tensor(rng.choice(graph.initializer), rng)
    elif roll == 1 and graph.node:
        node = rng.choice(graph.node)
        choice = rng.randrange(3)
        if choice == 0:
            node.op_type = rng.choice(_OPS)
        elif choice == 1 and node.input:
            node.input[rng.randrange(len(node.input))] = rng.choice(
                [i.name for i in graph.initializer] + ["", "nope"])
        else:
            node.attribute.append(helper.make_attribute(rng.choice(["axis", "transB", "block_size"]),
                                                        rng.choice([-1, 0, 1, 2, 16])))
    elif roll == 2 and graph.initializer:
        del graph.initializer[rng.randrange(len(graph.initializer))]
    elif roll == 3:
        model.opset_import[0].version = rng.choice([1, 7, 11, 13, 19, 21, 23, 99])
    elif roll == 4 and model.metadata_props:
        prop = rng.choice(model.metadata_props)
        new = _json_mutate(prop.value, rng)
        prop.value = new if isinstance(new, str) else json.dumps(new)
    elif roll == 5:
        model.ir_version = rng.choice([1, 3, 4, 7, 8, 10, 11, 99])
    elif graph.initializer:
        rng.choice(graph.initializer).name = rng.choice([n.name for n in graph.initializer] + ["x"])
    try:
        return model.SerializeToString()
    except Exception:
        return body


def mutate_bytes(body: bytes, rng: random.Random, others: list[bytes]) -> bytes:
    """Bit flips, overwritten or inserted bytes, truncation, and splices with another input."""
    data = bytearray(body)
    roll = rng.randrange(6)
    if roll == 0 and data:
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    elif roll == 1 and data:
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(len(data))] = rng.choice([0, 0xFF, 0x7F, 0x80, rng.randrange(256)])
    elif roll == 2:
        return bytes(data[: rng.randint(0, len(data))])
    elif roll == 3:
        at = rng.randint(0, len(data))
        data[at:at] = rng.randbytes(rng.randint(1, 32))
    elif roll == 4 and others:
        other = rng.choice(others)
        return bytes(data[: rng.randint(0, len(data))]) + other[rng.randint(0, len(other)):]
    elif data:
        at, size = rng.randrange(len(data)), rng.randint(1, 64)
        del data[at:at + size]
    return bytes(data)


def mutate(data: bytes, rng: random.Random, others: list[bytes] = ()) -> bytes:
    """One mutation of a packed input: structure-aware for its format, or raw bytes."""
    suffix, body = unpack(data)
    if rng.random() < 0.55:
        try:
            return pack(suffix, (mutate_onnx if suffix == ".onnx" else mutate_safetensors)(body, rng))
        except Exception:  # e.g. protobuf refusing to set a non-UTF-8 name: mutate bytes instead
            pass
    return pack(suffix, mutate_bytes(body, rng, [unpack(o)[1] for o in others]))
